import threading
import time

import msgpack
import pytest
import torch
import zmq

from router import wire
from router.dispatcher import Dispatcher
from router.errors import DispatchTimeout, ExpertWorkerLost, PlacementError, RemoteExpertError
from router.expert_server import ExpertServer
from router.placement import PlacementTable
from tests.router.conftest import HIDDEN, NUM_EXPERTS, random_routing, reference, shard_compute

TOP_K = 4


def endpoints_of(servers: list[ExpertServer]) -> dict[int, str]:
    return {worker: server.endpoint for worker, server in enumerate(servers)}


@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_dispatch_matches_direct_computation(num_workers, weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, num_workers)
    servers = start_servers(placement)
    dispatcher = make_dispatcher(placement, endpoints_of(servers))
    for layer, num_tokens, seed in [(1, 37, 0), (3, 1, 1), (1, 200, 2)]:
        x, ids, w = random_routing(num_tokens, TOP_K, seed)
        got = dispatcher.submit(layer, x, ids, w).result()
        assert got.dtype == torch.float32 and got.shape == (num_tokens, HIDDEN)
        torch.testing.assert_close(got, reference(weights, layer, x, ids, w), rtol=1e-5, atol=1e-5)


def test_dispatch_with_replicas_matches_and_spreads_load(weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2, replicas=2)  # every expert on both workers
    servers = start_servers(placement)
    dispatcher = make_dispatcher(placement, endpoints_of(servers))
    x, ids, w = random_routing(64, TOP_K, seed=5)
    torch.testing.assert_close(
        dispatcher.submit(1, x, ids, w).result(), reference(weights, 1, x, ids, w), rtol=1e-5, atol=1e-5
    )
    # token t goes to replica t % 2 of its expert: worker (owner + t % 2) % 2
    owner = ids * 2 // NUM_EXPERTS
    dest = (owner + (torch.arange(64) % 2).unsqueeze(1)) % 2
    for worker, server in enumerate(servers):
        want = torch.bincount(ids[dest == worker], minlength=NUM_EXPERTS)
        assert torch.equal(server.counters.tokens_per_expert(1), want)


def test_dispatch_sends_each_worker_only_its_tokens(weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 4)  # worker w holds experts 2w and 2w + 1
    servers = start_servers(placement)
    dispatcher = make_dispatcher(placement, endpoints_of(servers))
    x, _, _ = random_routing(3, 2, seed=4)
    # Worker 0 gets tokens 0 and 1, worker 2 tokens 1 and 2 (its first token is worker 0's last),
    # workers 1 and 3 nothing.
    ids = torch.tensor([[0, 1], [1, 4], [5, 4]])
    w = torch.tensor([[0.5, 0.5], [0.75, 0.25], [0.375, 0.625]])
    got = dispatcher.submit(1, x, ids, w).result()
    torch.testing.assert_close(got, reference(weights, 1, x, ids, w), rtol=1e-5, atol=1e-5)
    assert [server.counters.total_tokens() for server in servers] == [2, 0, 2, 0]


def test_a_worker_needing_most_tokens_gets_them_all(weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 4)  # worker w holds experts 2w and 2w + 1
    servers = start_servers(placement)
    dispatcher = make_dispatcher(placement, endpoints_of(servers))
    x, _, _ = random_routing(5, 2, seed=6)
    # Worker 0 is needed by 4 of the 5 tokens (the FULL_BATCH_SHARE of 0.8): it gets all 5 rows and
    # answers zeros for the fifth. Worker 2 is needed by 3 of 5 and gets only those.
    ids = torch.tensor([[0, 1], [1, 4], [0, 5], [1, 0], [4, 5]])
    w = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    got = dispatcher.submit(1, x, ids, w).result()
    torch.testing.assert_close(got, reference(weights, 1, x, ids, w), rtol=1e-5, atol=1e-5)
    assert [server.counters.total_tokens() for server in servers] == [5, 0, 3, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dispatch_half_precision_returns_input_dtype(dtype, weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    dispatcher = make_dispatcher(placement, endpoints_of(start_servers(placement)))
    x, ids, w = random_routing(50, TOP_K, seed=3)
    x = x.to(dtype)
    got = dispatcher.submit(3, x, ids, w).result()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), reference(weights, 3, x.float(), ids, w), rtol=2e-2, atol=2e-2)


def test_server_counters_match_routing(start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    servers = start_servers(placement)
    dispatcher = make_dispatcher(placement, endpoints_of(servers))
    x, ids, w = random_routing(120, TOP_K, seed=7)
    dispatcher.submit(1, x, ids, w).result()
    dispatcher.submit(1, x, ids, w).result()
    expected = 2 * torch.bincount(ids.reshape(-1), minlength=NUM_EXPERTS)
    for worker, server in enumerate(servers):
        held = torch.zeros(NUM_EXPERTS, dtype=torch.bool)
        held[placement.experts_of(worker)] = True
        assert torch.equal(server.counters.tokens_per_expert(1), torch.where(held, expected, 0))
        assert int(server.counters.tokens_per_expert(3).sum()) == 0
        snap = msgpack.unpackb(msgpack.packb(server.counters.snapshot()))
        (layer,) = snap["layers"]
        assert layer["layer"] == 1 and layer["dispatches"] == 2 and snap["errors"] == 0
        assert layer["tokens_per_expert"] == torch.where(held, expected, 0).tolist()
        assert layer["bytes_received"] > 0 and layer["bytes_sent"] > 0

    links = dispatcher.counters.snapshot()["links"]
    assert [(link["layer"], link["worker"], link["dispatches"]) for link in links] == [(1, 0, 2), (1, 1, 2)]
    assert sum(link["pairs_sent"] for link in links) == 2 * ids.numel()
    for link in links:
        assert link["rtt_s_count"] == 2 and 0 < link["rtt_s_max"] <= link["rtt_s_sum"]
        payload_bytes = link["tokens_sent"] * HIDDEN * 4
        assert payload_bytes < link["bytes_received"] < payload_bytes + 200  # y plus the header
        assert link["bytes_sent"] > payload_bytes + link["pairs_sent"] * 12


def test_two_dispatchers_share_servers_from_two_threads(weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    servers = start_servers(placement)
    dispatchers = [make_dispatcher(placement, endpoints_of(servers)) for _ in range(2)]
    failures: list[BaseException] = []

    def run(client: int) -> None:
        try:
            for step in range(25):
                layer = (1, 3)[step % 2]
                x, ids, w = random_routing(16 + step, TOP_K, seed=1000 * client + step)
                got = dispatchers[client].submit(layer, x, ids, w).result()
                torch.testing.assert_close(got, reference(weights, layer, x, ids, w), rtol=1e-5, atol=1e-5)
        except BaseException as exc:  # reported to the main thread below
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(client,)) for client in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    assert sum(server.counters.snapshot()["layers"][0]["dispatches"] for server in servers) == 2 * 2 * 13


def test_two_dispatches_in_flight_collected_in_reverse_order(weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    dispatcher = make_dispatcher(placement, endpoints_of(start_servers(placement)))
    x1, ids1, w1 = random_routing(10, TOP_K, seed=11)
    x3, ids3, w3 = random_routing(20, TOP_K, seed=12)
    first = dispatcher.submit(1, x1, ids1, w1)
    second = dispatcher.submit(3, x3, ids3, w3)
    torch.testing.assert_close(second.result(), reference(weights, 3, x3, ids3, w3), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.result(), reference(weights, 1, x1, ids1, w1), rtol=1e-5, atol=1e-5)
    assert first.result() is first.result()


def test_no_tokens_returns_empty_without_sending(start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    dispatcher = make_dispatcher(placement, endpoints_of(start_servers(placement)))
    x = torch.empty(0, HIDDEN, dtype=torch.bfloat16)
    got = dispatcher.submit(1, x, torch.empty(0, TOP_K, dtype=torch.int64), torch.empty(0, TOP_K)).result()
    assert got.shape == (0, HIDDEN) and got.dtype == torch.bfloat16
    assert dispatcher.counters.snapshot()["links"] == []


def test_error_reply_raises_remote_expert_error(start_servers, make_dispatcher, weights) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    dispatcher = make_dispatcher(placement, endpoints_of(start_servers(placement)))
    x, ids, w = random_routing(8, TOP_K, seed=2)
    with pytest.raises(RemoteExpertError, match=r"expert worker \d at tcp://127.0.0.1:\d+, layer 7: KeyError: 7"):
        dispatcher.submit(7, x, ids, w).result()
    # the dispatcher keeps working, and the other worker's late reply is dropped as stale
    torch.testing.assert_close(
        dispatcher.submit(1, x, ids, w).result(), reference(weights, 1, x, ids, w), rtol=1e-5, atol=1e-5
    )
    assert dispatcher.counters.snapshot()["remote_errors"] == 1


class RawClient:
    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.connect(endpoint)

    def ask(self, frames: list) -> wire.Message:
        self.sock.send_multipart(frames, copy=False)
        return wire.decode(self.sock.recv_multipart(copy=False))

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def raw_client(start_servers):
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    (server, _) = start_servers(placement)
    client = RawClient(server.endpoint)
    yield server, client
    client.close()


def good_dispatch(req: int, layer: int = 1, experts: tuple[int, ...] = (0, 3)) -> wire.Dispatch:
    x, _, _ = random_routing(2, 1, seed=req)
    pairs = wire.pack_pairs(torch.tensor([0, 1]), torch.tensor(experts), torch.tensor([0.5, 0.25]))
    return wire.Dispatch(req, layer, x, pairs)


def test_server_answers_malformed_messages_with_errors_and_keeps_serving(raw_client, weights) -> None:
    server, client = raw_client
    frames = wire.encode(good_dispatch(req=1))

    reply = client.ask([b"\xc1 not msgpack"])
    assert isinstance(reply, wire.ErrorReply) and reply.req == -1 and "not msgpack" in reply.reason

    reply = client.ask([frames[0], bytes(memoryview(frames[1]))[:-1], *frames[2:]])
    assert isinstance(reply, wire.ErrorReply) and reply.req == 1 and "frame x has" in reply.reason

    reply = client.ask(wire.encode(good_dispatch(req=2, layer=99)))
    assert isinstance(reply, wire.ErrorReply) and (reply.req, reply.layer) == (2, 99) and reply.reason == "KeyError: 99"

    reply = client.ask(wire.encode(good_dispatch(req=3, experts=(0, 6))))  # expert 6 lives on the other worker
    assert isinstance(reply, wire.ErrorReply) and "expert 6 is not held" in reply.reason

    reply = client.ask(wire.encode(good_dispatch(req=4, experts=(0, NUM_EXPERTS))))
    assert isinstance(reply, wire.ErrorReply) and "expert ids 0..8 outside 0..7" in reply.reason

    reply = client.ask(wire.encode(good_dispatch(req=4, experts=(-1, 0))))
    assert isinstance(reply, wire.ErrorReply) and "expert ids -1..0 outside 0..7" in reply.reason

    reply = client.ask(wire.encode(wire.Result(5, 1, torch.zeros(1, HIDDEN))))
    assert isinstance(reply, wire.ErrorReply) and "accepts dispatch messages" in reply.reason

    good = good_dispatch(req=6)
    reply = client.ask(wire.encode(good))
    assert isinstance(reply, wire.Result) and reply.req == 6
    want = torch.stack([0.5 * weights[1][0](good.x[0]), 0.25 * weights[1][3](good.x[1])])
    torch.testing.assert_close(reply.y, want, rtol=1e-5, atol=1e-5)
    assert server.counters.snapshot()["errors"] == 7


def test_compute_returning_wrong_shape_is_an_error_reply(start_servers) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 1)
    (server,) = start_servers(placement, compute=lambda layer, x, *_: x[:1])
    client = RawClient(server.endpoint)
    try:
        reply = client.ask(wire.encode(good_dispatch(req=1)))
        assert isinstance(reply, wire.ErrorReply) and "compute returned shape [1, 32], expected [2, 32]" in reply.reason
    finally:
        client.close()


def test_unexpected_compute_failure_is_an_error_reply(start_servers) -> None:
    def broken(*_: object) -> torch.Tensor:
        raise RuntimeError("out of memory")

    (server,) = start_servers(PlacementTable.even(NUM_EXPERTS, 1), compute=broken)
    client = RawClient(server.endpoint)
    try:
        reply = client.ask(wire.encode(good_dispatch(req=1)))
        assert isinstance(reply, wire.ErrorReply) and reply.reason == "RuntimeError: out of memory"
    finally:
        client.close()


def free_endpoint() -> str:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    sock.close(linger=0)
    ctx.term()
    return f"tcp://127.0.0.1:{port}"


def test_no_server_on_port_times_out(start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    (alive, _) = start_servers(PlacementTable.even(NUM_EXPERTS, 2))
    dead = free_endpoint()
    dispatcher = make_dispatcher(placement, {0: alive.endpoint, 1: dead}, timeout_s=1.0)
    x, ids, w = random_routing(8, TOP_K, seed=4)
    ids[:, 0] = 7  # every token needs worker 1
    pending = dispatcher.submit(1, x, ids, w)
    started_s = time.monotonic()
    with pytest.raises(DispatchTimeout, match=f"layer 1: no reply within 1.0 s from worker 1 at {dead}$"):
        pending.result()
    assert time.monotonic() - started_s < 2.0
    assert dispatcher.counters.snapshot()["timeouts"] == 1


def test_stopped_server_fails_the_dispatch_at_once_and_a_restarted_one_serves_again(
        weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    servers = start_servers(placement)
    dispatcher = make_dispatcher(placement, endpoints_of(servers), timeout_s=20.0)
    x, ids, w = random_routing(8, TOP_K, seed=4)
    ids[:, 0] = 0
    dispatcher.submit(1, x, ids, w).result()
    servers[0].stop()
    servers[0].stop()  # idempotent
    started_s = time.monotonic()
    with pytest.raises(ExpertWorkerLost, match=f"expert worker 0 at {servers[0].endpoint} dropped"):
        dispatcher.submit(3, x, ids, w).result()
    assert time.monotonic() - started_s < 5.0  # the connection drop, not the 20 s timeout
    with pytest.raises(ExpertWorkerLost):  # still gone: fails at once again
        dispatcher.submit(3, x, ids, w).result()
    port = int(servers[0].endpoint.rsplit(":", 1)[1])
    compute = shard_compute(weights, set(placement.experts_of(0)))
    with ExpertServer(compute, NUM_EXPERTS, port=port).start():
        deadline = time.monotonic() + 10
        while True:  # ZMQ reconnects on its own; the dispatcher notices the new connection
            try:
                got = dispatcher.submit(1, x, ids, w).result()
                break
            except ExpertWorkerLost:
                assert time.monotonic() < deadline, "no reconnection within 10 s"
                time.sleep(0.05)
        torch.testing.assert_close(got, reference(weights, 1, x, ids, w), rtol=1e-5, atol=1e-5)


def test_late_reply_of_timed_out_request_is_ignored(weights, start_servers, make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 1)
    fast = shard_compute(weights, set(range(NUM_EXPERTS)))
    calls = []

    def slow_first(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.6)
        return fast(*args)

    (server,) = start_servers(placement, compute=slow_first)
    dispatcher = make_dispatcher(placement, {0: server.endpoint}, timeout_s=0.3)
    x, ids, w = random_routing(8, TOP_K, seed=9)
    with pytest.raises(DispatchTimeout):
        dispatcher.submit(1, x, ids, w).result()
    time.sleep(0.5)  # the first reply arrives late and must not be taken for the second
    x2, ids2, w2 = random_routing(8, TOP_K, seed=10)
    torch.testing.assert_close(
        dispatcher.submit(1, x2, ids2, w2).result(), reference(weights, 1, x2, ids2, w2), rtol=1e-5, atol=1e-5
    )
    assert dispatcher.counters.snapshot()["stale_replies"] == 1


def test_server_lifecycle(weights) -> None:
    never_started = ExpertServer(shard_compute(weights, {0}), num_experts=NUM_EXPERTS)
    never_started.stop()
    never_started.stop()
    with ExpertServer(shard_compute(weights, {0}), num_experts=NUM_EXPERTS) as server:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        assert server.start() is server
    with pytest.raises(RuntimeError, match="was stopped"):
        server.start()


def test_dispatcher_validation_and_close(start_servers) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, 2)
    with pytest.raises(PlacementError, match=r"no endpoint for expert worker\(s\) \[1\]"):
        Dispatcher(placement, {0: "tcp://127.0.0.1:1"})
    dispatcher = Dispatcher(placement, endpoints_of(start_servers(placement)))
    x, ids, w = random_routing(4, TOP_K, seed=1)
    with pytest.raises(ValueError, match="x dtype torch.float64"):
        dispatcher.submit(1, x.double(), ids, w)
    with pytest.raises(ValueError, match=r"topk_weights \[4, 3\] must match topk_ids \[4, 4\]"):
        dispatcher.submit(1, x, ids, w[:, :3])
    with pytest.raises(ValueError, match="need x"):
        dispatcher.submit(1, x[:3], ids, w)
    for bad in (ids + NUM_EXPERTS, ids - NUM_EXPERTS):
        with pytest.raises(PlacementError, match=f"topk_ids outside 0..{NUM_EXPERTS - 1}"):
            dispatcher.submit(1, x, bad, w)
    dispatcher.close()
    dispatcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        dispatcher.submit(1, x, ids, w)


def scaled_rows(
    layer: int, x: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor
) -> torch.Tensor:
    """A compute whose reply per worker is easy to rebuild: x[t] times the sum of t's pair weights there."""
    scale = torch.zeros(x.shape[0], dtype=torch.float32).index_add_(0, pair_token.long(), pair_weight)
    return x * scale.to(x.dtype).unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_workers", [2, 4])
def test_half_precision_replies_are_summed_in_float32_and_rounded_once(num_workers, dtype, start_servers,
                                                                        make_dispatcher) -> None:
    placement = PlacementTable.even(NUM_EXPERTS, num_workers)
    dispatcher = make_dispatcher(placement, endpoints_of(start_servers(placement, compute=scaled_rows)))
    x, ids, w = random_routing(40, 2, seed=9)  # top-2 of 8: some tokens skip a worker, some do not
    x = x.to(dtype)
    worker = placement.choose(ids)
    want = torch.zeros(x.shape, dtype=torch.float32)
    for index in range(num_workers):  # each worker's reply, as it computes it, summed in float32
        scale = torch.where(worker == index, w, 0).sum(dim=1)
        want += x * scale.to(dtype).unsqueeze(1)
    got = dispatcher.submit(1, x, ids, w).result()
    # Two workers add in the dtype, four in float32 (the C++ combine always in float32; it
    # declines float16, which torch then sums); with top-2 no token has more than two non-zero
    # terms, so every way the result is the float32 sum rounded once, bit for bit.
    assert got.dtype == dtype and torch.equal(got, want.to(dtype))


def test_a_malformed_reply_fails_the_dispatches_waiting_on_that_worker(make_dispatcher) -> None:
    """A peer that answers every dispatch with garbage: a clear error at once, not a timeout or a crash."""
    ctx = zmq.Context()
    peer = ctx.socket(zmq.ROUTER)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def answer_garbage() -> None:
        while not stop.is_set():
            if peer.poll(50):
                identity, *_ = peer.recv_multipart()
                peer.send_multipart([identity, b"\xc1 not msgpack", b"x" * 8])

    thread = threading.Thread(target=answer_garbage, daemon=True)
    thread.start()
    try:
        endpoint = f"tcp://127.0.0.1:{port}"
        dispatcher = make_dispatcher(PlacementTable.even(NUM_EXPERTS, 1), {0: endpoint}, timeout_s=20.0)
        x, ids, w = random_routing(8, TOP_K, seed=4)
        for _ in range(2):  # the dispatcher keeps working after one
            started_s = time.monotonic()
            with pytest.raises(RemoteExpertError, match=f"layer 1: expert worker 0 at {endpoint} sent a malformed "
                                                        "reply \\(header frame is not msgpack"):
                dispatcher.submit(1, x, ids, w).result()
            assert time.monotonic() - started_s < 5.0  # not the 20 s timeout
        assert dispatcher.counters.snapshot()["remote_errors"] == 2
    finally:
        stop.set()
        thread.join(5)
        peer.close(linger=0)
        ctx.term()
