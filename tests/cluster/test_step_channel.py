"""The coordinator's step channel against attention-worker StepServers (real ZMQ sockets)."""

from __future__ import annotations

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


def test_steps_of_several_workers_run_concurrently_and_come_back_by_worker(servers):
    barrier = threading.Barrier(2, timeout=10)  # both steps must be in flight at once

    def run(chunks, sampling):
        barrier.wait()
        return StepOutput([chunks[0].token_ids[0] * 10], [None], [None])

    channel = StepChannel([servers(run).endpoint, servers(run).endpoint])
    try:
        out = channel.run({0: _step(1), 1: _step(2)})
        assert out == {0: StepOutput([10], [None], [None]), 1: StepOutput([20], [None], [None])}
    finally:
        channel.close()
        channel.close()


def test_a_failed_step_raises_worker_failure_and_the_channel_keeps_working(servers):
    def run(chunks, sampling):
        if chunks[0].token_ids == [0]:
            raise RuntimeError("dispatch to expert worker 1 timed out")
        return StepOutput([1], [None], [None])

    channel = StepChannel([servers(run).endpoint])
    try:
        with pytest.raises(WorkerFailure, match="step failed on attention worker 0: RuntimeError: dispatch to expert"):
            channel.run({0: _step(0)})
        assert channel.run({0: _step(5)}) == {0: StepOutput([1], [None], [None])}
    finally:
        channel.close()


def _serve_slow_steps(conn) -> None:
    """A worker process whose steps never finish (it is killed during one)."""
    server = StepServer(lambda chunks, sampling: time.sleep(600)).start()
    conn.send(server.endpoint)
    time.sleep(600)


def test_a_worker_process_killed_mid_step_fails_the_step_at_once():
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve_slow_steps, args=(child,), daemon=True)
    process.start()
    try:
        assert parent.poll(60), "the worker process did not start"
        channel = StepChannel([parent.recv()])
        outcome: dict = {}

        def call():
            try:
                channel.run({0: _step(1)})
            except WorkerFailure as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=call)
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


def test_a_worker_that_does_not_answer_fails_the_step_at_the_timeout_and_its_late_answer_is_dropped(servers):
    release = threading.Event()

    def run(chunks, sampling):
        if chunks[0].token_ids == [0]:
            release.wait(30)  # hung until the test lets it go
        return StepOutput([chunks[0].token_ids[0] + 100], [None], [None])

    channel = StepChannel([servers(run).endpoint], timeout_s=1.0)
    try:
        start = time.monotonic()
        with pytest.raises(WorkerFailure, match="attention worker 0 at .* did not answer step 0 within 1 s"):
            channel.run({0: _step(0)})
        assert 1.0 <= time.monotonic() - start < 5
        release.set()  # the worker answers step 0 late, then runs step 1: only step 1's answer counts
        assert channel.run({0: _step(7)}) == {0: StepOutput([107], [None], [None])}
    finally:
        release.set()
        channel.close()
