"""Server counters: a dispatch counted after its reply is sent is seen by every reader at once."""

from __future__ import annotations

import threading

import torch

from router.counters import ServerCounters


def test_a_dispatch_recorded_later_is_seen_by_readers_before_the_flush() -> None:
    counters = ServerCounters(num_experts=4)
    experts = torch.tensor([0, 3, 3], dtype=torch.int32)
    counters.record_later(2, experts, 2, [b"abc", bytes(10)], [b"de"])
    # no flush yet: every reader counts it first
    assert counters.total_tokens() == 2
    assert counters.tokens_per_expert(2).tolist() == [1, 0, 0, 2]
    (layer,) = counters.snapshot()["layers"]
    assert (layer["dispatches"], layer["pairs"], layer["bytes_received"], layer["bytes_sent"]) == (1, 3, 13, 2)
    counters.flush()  # already counted: nothing more
    counters.record_later(2, experts[:1], 1, [b"x"], [b"y"])
    counters.record_later(5, experts[1:], 1, [b"x"], [b"y"])  # counts the one before it
    counters.flush()
    counters.flush()
    assert counters.tokens_per_expert(2).tolist() == [2, 0, 0, 2]
    assert counters.tokens_per_expert(5).tolist() == [0, 0, 0, 2]
    assert counters.total_tokens() == 4


def test_readers_and_the_server_thread_count_each_dispatch_once() -> None:
    counters = ServerCounters(num_experts=2)
    experts = torch.tensor([1], dtype=torch.int32)
    rounds = 2000

    def serve() -> None:
        for _ in range(rounds):
            counters.record_later(0, experts, 1, [b"ab"], [b"c"])
            counters.flush()

    server = threading.Thread(target=serve)
    server.start()
    seen = []
    while server.is_alive():
        seen.append(counters.total_tokens())
    server.join()
    assert seen == sorted(seen)
    assert counters.total_tokens() == rounds and counters.tokens_per_expert(0).tolist() == [0, rounds]
    assert counters.snapshot()["layers"][0]["bytes_received"] == 2 * rounds
