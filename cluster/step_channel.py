"""StepChannel: the coordinator's end of the step channel to the attention workers.

One DEALER socket per attention worker; ``run`` sends each worker its step (``workers.step_wire``)
and waits for every reply (``send`` and ``collect`` are its two halves, for a caller that works
while the step runs). The steps of different workers run concurrently. A worker whose
connection drops (its process died) fails the step at once through a ZMQ socket monitor; a step
that failed on the worker comes back as an error reply, and a worker that does not answer within
``timeout_s`` (hung, or its process stopped) fails the step when the time is up; all three raise
``WorkerFailure``. A late answer to a failed step is read and dropped. Used from one thread at a
time.
"""

from __future__ import annotations

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
        self._step_ids = itertools.count()
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
        step_id = sent.step_id
        waiting = set(sent.workers)
        out: dict[int, StepOutput] = {}
        errors: dict[int, str] = {}
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while waiting:
            lost = self._watch.lost & waiting
            for worker in lost:
                errors[worker] = f"attention worker {worker} at {self.endpoints[worker]} died (its connection dropped)"
            waiting -= lost
            left_ms = None if deadline is None else max(0, round((deadline - time.monotonic()) * 1000))
            if waiting and left_ms == 0:
                for worker in waiting:
                    errors[worker] = (f"attention worker {worker} at {self.endpoints[worker]} did not answer step "
                                      f"{step_id} within {self.timeout_s:g} s (hung or stopped)")
                waiting.clear()
            if not waiting:
                break
            for sock, _ in self._poller.poll(left_ms):
                if self._watch.owns(sock):
                    self._watch.read(sock)
                    continue
                worker = self._worker_of[sock]
                try:
                    reply_id, result = decode_reply(sock.recv(zmq.NOBLOCK))
                except StepWireError as exc:
                    waiting.discard(worker)
                    errors[worker] = f"attention worker {worker} sent a bad reply: {exc}"
                    continue
                if reply_id != step_id or worker not in waiting:
                    continue  # the reply to an earlier step that already failed
                waiting.discard(worker)
                if isinstance(result, str):
                    errors[worker] = f"step failed on attention worker {worker}: {result}"
                else:
                    out[worker] = result
        if errors:
            raise WorkerFailure("; ".join(errors[w] for w in sorted(errors)))
        return out

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
