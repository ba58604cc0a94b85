"""The coordinator's step channel against attention-worker StepServers (real ZMQ sockets), waiting
for replies either blocking (``collect``) or on an asyncio loop (``collect_async``)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time

import pytest

from cluster.errors import WorkerFailure
from cluster.step_channel import StepChannel
from workers.batch import SequenceChunk
from workers.model_runner import RowSampling, StepOutput
from workers.sampling import SamplingParams
from workers.step_server import StepServer

GREEDY = SamplingParams(temperature=0.0)


def _step(token: int):
    return [SequenceChunk([token], 0, [0])], [RowSampling(GREEDY, 0)]


WAITS = ["blocking", "asyncio"]


def _run(channel: StepChannel, steps, wait: str):
    if wait == "blocking":
        return channel.run(steps)
    return asyncio.run(channel.collect_async(channel.send(steps)))


@pytest.fixture
def servers():
    started: list[StepServer] = []

    def start(run) -> StepServer:
        server = StepServer(run).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize("wait", WAITS)
def test_steps_of_several_workers_run_concurrently_and_come_back_by_worker(servers, wait):
    barrier = threading.Barrier(2, timeout=10)  # both steps must be in flight at once

    def run(chunks, sampling):
        barrier.wait()
        return StepOutput([chunks[0].token_ids[0] * 10], [None], [None])

    channel = StepChannel([servers(run).endpoint, servers(run).endpoint])
    try:
        out = _run(channel, {0: _step(1), 1: _step(2)}, wait)
        assert out == {0: StepOutput([10], [None], [None]), 1: StepOutput([20], [None], [None])}
    finally:
        channel.close()
        channel.close()


@pytest.mark.parametrize("wait", WAITS)
def test_a_failed_step_raises_worker_failure_and_the_channel_keeps_working(servers, wait):
    def run(chunks, sampling):
        if chunks[0].token_ids == [0]:
            raise RuntimeError("dispatch to expert worker 1 timed out")
        return StepOutput([1], [None], [None])

    channel = StepChannel([servers(run).endpoint])
    try:
        with pytest.raises(WorkerFailure, match="step failed on attention worker 0: RuntimeError: dispatch to expert"):
            _run(channel, {0: _step(0)}, wait)
        assert _run(channel, {0: _step(5)}, wait) == {0: StepOutput([1], [None], [None])}
    finally:
        channel.close()


def _serve_slow_steps(conn) -> None:
    """A worker process whose steps never finish (it is killed during one)."""
    server = StepServer(lambda chunks, sampling: time.sleep(600)).start()
    conn.send(server.endpoint)
    time.sleep(600)


@pytest.mark.parametrize("wait", WAITS)
def test_a_worker_process_killed_mid_step_fails_the_step_at_once(wait):
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve_slow_steps, args=(child,), daemon=True)
    process.start()
    try:
        assert parent.poll(60), "the worker process did not start"
        channel = StepChannel([parent.recv()])
        outcome: dict = {}

        def call():
            try:
                _run(channel, {0: _step(1)}, wait)
            except WorkerFailure as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=call, daemon=True)  # a hang fails the test, not the run
        thread.start()
        time.sleep(1.0)  # the step is running in the worker
        process.kill()
        killed_at = time.monotonic()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the step hung after the worker died"
        assert "attention worker 0" in str(outcome["error"]) and "connection dropped" in str(outcome["error"])
        assert time.monotonic() - killed_at < 5
        assert channel.lost_workers() == {0}
        channel.close()
    finally:
        process.kill()
        process.join(10)


@pytest.mark.parametrize("wait", WAITS)
def test_a_worker_that_does_not_answer_fails_the_step_at_the_timeout_and_its_late_answer_is_dropped(servers, wait):
    release = threading.Event()

    def run(chunks, sampling):
        if chunks[0].token_ids == [0]:
            release.wait(30)  # hung until the test lets it go
        return StepOutput([chunks[0].token_ids[0] + 100], [None], [None])

    channel = StepChannel([servers(run).endpoint], timeout_s=1.0)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="attention worker 0 at .* did not answer step 0 within 1 s"):
            _run(channel, {0: _step(0)}, wait)
        assert 1.0 <= time.monotonic() - start < 5
        release.set()  # the worker answers step 0 late, then runs step 1: only step 1's answer counts
        assert _run(channel, {0: _step(7)}, wait) == {0: StepOutput([107], [None], [None])}
    finally:
        release.set()
        channel.close()


@pytest.mark.parametrize("wait", WAITS)
def test_a_later_steps_reply_read_while_collecting_an_earlier_step_is_kept_for_its_collect(servers, wait):
    """Two steps in flight: worker 0 answers both while worker 1 still computes the first."""
    release = threading.Event()

    def fast(chunks, sampling):
        return StepOutput([chunks[0].token_ids[0]], [None], [None])

    def slow(chunks, sampling):
        release.wait(30)
        return StepOutput([chunks[0].token_ids[0] + 1000], [None], [None])

    channel = StepChannel([servers(fast).endpoint, servers(slow).endpoint], timeout_s=10)  # a lost reply fails
    collect = channel.collect if wait == "blocking" else lambda sent: asyncio.run(channel.collect_async(sent))
    try:
        first = channel.send({0: _step(1), 1: _step(2)})
        second = channel.send({0: _step(3), 1: _step(4)})
        time.sleep(0.5)  # worker 0 has answered both steps by now
        threading.Timer(0.5, release.set).start()
        assert collect(first) == {0: StepOutput([1], [None], [None]), 1: StepOutput([1002], [None], [None])}
        assert collect(second) == {0: StepOutput([3], [None], [None]), 1: StepOutput([1004], [None], [None])}
    finally:
        release.set()
        channel.close()
