"""StepChannel: the coordinator's end of the step channel to the attention workers.

One DEALER socket per attention worker; ``run`` sends each worker its step (``workers.step_wire``)
and waits for every reply (``send`` and ``collect`` are its two halves, for a caller that works
while the step runs; ``collect_async`` waits on the caller's asyncio loop instead of blocking).
The steps of different workers run concurrently. A worker whose connection drops (its process
died) fails the step at once through a ZMQ socket monitor; a step that failed on the worker
comes back as an error reply, and a worker that does not answer within ``timeout_s`` (hung, or
its process stopped) fails the step when the time is up; all three raise ``WorkerFailure``. A
late answer to a failed step is read and dropped; an answer to a later step that arrives while an
earlier one is collected is kept for that step's collect. Used from one thread at a time.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

import zmq

from cluster.errors import WorkerFailure
from router.connection_watch import ConnectionWatch
from workers.batch import SequenceChunk
from workers.model_runner import RowSampling, StepOutput
from workers.step_wire import StepWireError, decode_reply, encode_step

WorkerStep = tuple[list[SequenceChunk], list[RowSampling]]


@dataclass(frozen=True)
class SentStep:
    """A step sent to some attention workers, whose replies are still to collect."""

    step_id: int
    workers: frozenset[int]


class _Collecting:
    """The replies of one sent step so far."""

    def __init__(self, sent: SentStep, deadline: float | None) -> None:
        self.step_id = sent.step_id
        self.waiting = set(sent.workers)
        self.deadline = deadline
        self.outputs_by_worker: dict[int, StepOutput] = {}
        self.errors: dict[int, str] = {}

    def accept(self, worker: int, result: StepOutput | str) -> None:
        self.waiting.discard(worker)
        if isinstance(result, str):
            self.errors[worker] = f"step failed on attention worker {worker}: {result}"
        else:
            self.outputs_by_worker[worker] = result

    def left_ms(self) -> int | None:
        return None if self.deadline is None else max(0, round((self.deadline - time.monotonic()) * 1000))

    def outputs(self) -> dict[int, StepOutput]:
        if self.errors:
            raise WorkerFailure("; ".join(self.errors[w] for w in sorted(self.errors)))
        return self.outputs_by_worker


class StepChannel:
    def __init__(self, endpoints: list[str], timeout_s: float | None = None) -> None:
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self._poller = zmq.Poller()
        for endpoint in self.endpoints:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            self._sockets.append(sock)
            self._poller.register(sock, zmq.POLLIN)
        self._worker_of = {sock: worker for worker, sock in enumerate(self._sockets)}
        self._watch = ConnectionWatch(dict(enumerate(self._sockets)), self._poller)
        # what ZMQ signals when a socket (a step socket or a monitor) may have a message
        self._fds = [sock.getsockopt(zmq.FD) for sock, _ in self._poller.sockets]
        self._step_ids = itertools.count()
        # Replies to steps sent after the one being collected (several steps may be in flight, and
        # one worker may answer the next step before another answers this one): step -> worker -> reply.
        self._early: dict[int, dict[int, StepOutput | str]] = {}
        self._closed = False

    def run(self, steps: dict[int, WorkerStep]) -> dict[int, StepOutput]:
        """Run each worker's step (keys: worker index) and return their outputs."""
        return self.collect(self.send(steps))

    def send(self, steps: dict[int, WorkerStep]) -> SentStep:
        """Send each worker its step and return at once; ``collect`` waits for the replies.

        The two may run on different threads, one after the other (never at the same time)."""
        if self._closed:
            raise RuntimeError("step channel is closed")
        step_id = next(self._step_ids)
        for worker, (chunks, sampling) in steps.items():
            self._sockets[worker].send(encode_step(step_id, chunks, sampling), copy=False)
        return SentStep(step_id, frozenset(steps))

    def collect(self, sent: SentStep) -> dict[int, StepOutput]:
        """Wait for every reply to a ``send``; raises WorkerFailure as described above."""
        state = self._start(sent)
        while self._still_waiting(state):
            self._read_replies(state, state.left_ms())
        return state.outputs()

    async def collect_async(self, sent: SentStep) -> dict[int, StepOutput]:
        """``collect`` for an asyncio caller: the event loop itself watches the sockets' file
        descriptors, so no thread wakes up to wait for the replies and hand them over."""
        state = self._start(sent)
        while self._still_waiting(state):
            # Read all that is there before sleeping: ZMQ's descriptor signals only a socket going
            # from nothing to read to something (a second monitor event behind a first one would
            # never wake us).
            if not self._read_replies(state, 0):
                await self._readable(state.left_ms())
        return state.outputs()

    def _still_waiting(self, state: _Collecting) -> bool:
        """Fail the workers that are lost or out of time; whether any reply is still to come."""
        lost = self._watch.lost & state.waiting
        for worker in lost:
            state.errors[worker] = (f"attention worker {worker} at {self.endpoints[worker]} died "
                                    "(its connection dropped)")
        state.waiting -= lost
        if state.waiting and state.left_ms() == 0:
            for worker in state.waiting:
                state.errors[worker] = (f"attention worker {worker} at {self.endpoints[worker]} did not answer step "
                                        f"{state.step_id} within {self.timeout_s:g} s (hung or stopped)")
            state.waiting.clear()
        return bool(state.waiting)

    def _read_replies(self, state: _Collecting, timeout_ms: int | None) -> int:
        """One poll of the sockets (``timeout_ms``: 0 returns at once, None waits without limit),
        reading a message of each that has one; how many had one."""
        ready = self._poller.poll(timeout_ms)
        for sock, _ in ready:
            if self._watch.owns(sock):
                self._watch.read(sock)
                continue
            worker = self._worker_of[sock]
            try:
                reply_id, result = decode_reply(sock.recv(zmq.NOBLOCK))
            except zmq.Again:  # nothing after all (defensive: this thread is the sockets' only reader)
                continue
            except StepWireError as exc:
                state.waiting.discard(worker)
                state.errors[worker] = f"attention worker {worker} sent a bad reply: {exc}"
                continue
            if reply_id > state.step_id:  # a later step in flight: kept for its own collect
                self._early.setdefault(reply_id, {})[worker] = result
            elif reply_id == state.step_id and worker in state.waiting:
                state.accept(worker, result)
            # else: the reply to an earlier step that already failed
        return len(ready)

    def _start(self, sent: SentStep) -> _Collecting:
        state = _Collecting(sent, None if self.timeout_s is None else time.monotonic() + self.timeout_s)
        for step_id in [i for i in self._early if i <= sent.step_id]:  # earlier ones: steps given up on
            for worker, result in self._early.pop(step_id).items():
                if step_id == sent.step_id and worker in state.waiting:
                    state.accept(worker, result)
        return state

    async def _readable(self, timeout_ms: int | None) -> None:
        """Until a socket may have something to read (ZMQ signals its file descriptor; the caller
        polls to see what) or ``timeout_ms`` passes."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)
        for fd in self._fds:
            loop.add_reader(fd, wake)
        timer = None if timeout_ms is None else loop.call_later(timeout_ms / 1000, wake)
        try:
            await ready
        finally:
            for fd in self._fds:
                loop.remove_reader(fd)
            if timer is not None:
                timer.cancel()

    def lost_workers(self) -> set[int]:
        """Workers whose connection dropped and has not come back (events read so far)."""
        return self._watch.refresh()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watch.close()
        for sock in self._sockets:
            sock.close()
        self._ctx.term()
