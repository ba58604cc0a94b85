"""Dispatcher: the attention worker's remote expert backend.

For one MoE layer it groups the (token, k) pairs by the expert worker that will compute them,
sends each worker the distinct tokens it needs plus its pairs, and returns at once so the caller
can compute the shared expert meanwhile; `PendingDispatch.result()` then sums the workers' replies
back into token order. A worker that needs (nearly) every token gets x as it is
(`FULL_BATCH_SHARE`), and a single reply that covers every token is the result as received, so
the common decode case adds no copies.
Used from a single thread.
"""

from __future__ import annotations

import itertools
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zmq

from router import wire
from router.connection_watch import ConnectionWatch
from router.counters import DispatcherCounters
from router.errors import DispatchTimeout, ExpertWorkerLost, PlacementError, RemoteExpertError, WireError
from router.placement import PlacementTable

HWM_MESSAGES = 1024
# A worker that needs at least this share of the tokens gets all of them (x as it is; the rows it
# has no pairs for come back as zeros): the few extra rows on the wire cost less than gathering its
# rows here and scattering its reply back into token order.
FULL_BATCH_SHARE = 0.8

Combine = Callable[[int, list[torch.Tensor], list[torch.Tensor | None]], torch.Tensor | None]
"""combine(num_tokens, replies, rows) -> [num_tokens, H]: per token, the sum of the reply rows that
hold it, in float32, rounded once to the replies' dtype; rows[i] (int64) names the token of each
row of replies[i], None meaning every token in order; tokens no reply holds are zero. It returns
None for replies it does not sum (a dtype or width it lacks), which the dispatcher then sums in
torch. Called with at least one reply."""

Messages = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float, int, int],
                   list[tuple[int, bytes, torch.Tensor | None, bytes, torch.Tensor | None]]]
"""messages(x [T, H], topk_ids int64 [T, K], topk_weights float32 [T, K], table, counts, num_workers,
full_batch_share, req, layer) -> per destination worker (ascending, only those with pairs):
(worker, header, x_rows, pairs, rows), the dispatch `Dispatcher.submit` sends it, as its numpy
path builds it: `header` and `pairs` are the bytes of the frames `wire.dispatch_frames` makes
(pairs [3, P] int32 in token-major order: row, expert id, weight bits); `x_rows` the rows of x the
worker needs, gathered, and `rows` their tokens (int64), or both None when it gets x as it is
(`full_batch_share`). `table` and `counts` are `PlacementTable.replica_table()`. Raises IndexError
for an expert id outside the table."""


@dataclass(frozen=True)
class DispatchKernels:
    """Native replacements for the dispatcher's numpy, torch and wire paths, with the same results;
    the attention worker passes the C++ ones (`workers.cpu_kernels.dispatch_kernels`)."""

    messages: Messages
    combine: Combine
    decode_result: wire.DecodeResult


def _add_in_float32(total: torch.Tensor, rows: torch.Tensor | None, y: torch.Tensor) -> None:
    """``total[rows] += y`` in float32 (every row when ``rows`` is None)."""
    if rows is None:
        total.add_(y.float())  # a mixed-dtype add_ is far slower than the cast
    else:
        total.index_add_(0, rows, y.float())


class PendingDispatch:
    """Replies still to come for one `Dispatcher.submit`; `result()` waits for them."""

    def __init__(
        self, dispatcher: Dispatcher, req: int, layer: int, shape: torch.Size, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._dispatcher = dispatcher
        self.req = req
        self.layer = layer
        self._shape = shape  # [T, H] of x
        self._dtype = dtype
        self._device = device
        # worker -> rows of the token batch it was sent; None: every token, in order
        self._rows: dict[int, torch.Tensor | None] = {}
        self._sent_s: dict[int, float] = {}
        # (rows, y) as they came: up to two workers, or every worker when the dispatcher has kernels
        self._replies: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        self._float32_sum: torch.Tensor | None = None  # with three or more workers, summed as replies come
        self._x_frame: zmq.Frame | None = None  # x as one frame, for every worker sent all of it
        self._deadline_s = time.monotonic() + dispatcher.timeout_s
        self._error: Exception | None = None
        self._value: torch.Tensor | None = None

    def result(self) -> torch.Tensor:
        """The routed-expert output [T, H] in the dtype of `x`.

        When one worker computed every token, this is its reply as received: a tensor over the
        read-only frame, for out-of-place use. Raises DispatchTimeout if a worker has not answered
        by `timeout_s` after submit, RemoteExpertError if a worker answered with an error, and
        ExpertWorkerLost as soon as the connection to a worker it waits for drops.
        """
        if self._value is None and self._error is None:
            self._dispatcher._collect(self)
            if self._error is None:
                self._value = self._sum_replies().to(self._device)
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def waiting_for(self) -> list[int]:
        """Workers whose reply has not arrived yet."""
        return sorted(self._rows)

    def _accept(self, worker: int, msg: wire.Message) -> None:
        rows = self._rows.pop(worker)
        if isinstance(msg, wire.ErrorReply):
            endpoint = self._dispatcher.endpoints[worker]
            self._fail(RemoteExpertError(f"expert worker {worker} at {endpoint}, layer {self.layer}: {msg.reason}"))
            return
        expected = (self._shape[0] if rows is None else rows.shape[0], self._shape[1])
        if not isinstance(msg, wire.Result) or msg.y.shape != expected or msg.y.dtype != self._dtype:
            got = f"{msg.y.dtype} result of shape {list(msg.y.shape)}" if isinstance(msg, wire.Result) else "an error"
            self._fail(
                WireError(
                    f"expert worker {worker} replied {type(msg).__name__} ({got}) to layer {self.layer}, "
                    f"expected a {self._dtype} result of shape {list(expected)}"
                )
            )
            return
        if self._float32_sum is None:
            # this reply, those before it and those to come; kernels.combine sums them all at the end
            if self._dispatcher.kernels is not None or len(self._replies) + 1 + len(self._rows) <= 2:
                self._replies.append((rows, msg.y))
                return
            # Three or more replies: add each in float32 as it comes, while slower workers still compute.
            self._float32_sum = torch.zeros(self._shape, dtype=torch.float32)
        _add_in_float32(self._float32_sum, rows, msg.y)

    def _sum_replies(self) -> torch.Tensor:
        """Per token, the sum of the workers' replies, rounded once to the dtype of x.

        With one or two replies each element takes at most one add, which x's dtype rounds just
        as a float32 sum would; three or more replies were summed in float32 as they came. A
        dispatcher's `kernels.combine` gets every reply at once instead.
        """
        if self._float32_sum is not None:
            return self._float32_sum.to(self._dtype)
        if len(self._replies) == 1 and self._replies[0][0] is None:
            return self._replies[0][1]  # one worker computed every token: nothing to add
        kernels = self._dispatcher.kernels
        if kernels is not None and self._replies:
            out = kernels.combine(self._shape[0], [y for _, y in self._replies], [rows for rows, _ in self._replies])
            if out is not None:
                return out
        replies = sorted(self._replies, key=lambda reply: reply[0] is not None)  # whole-batch replies first
        if len(replies) > 2:  # kept for a combine that declined them: in float32, as _accept would have
            total = torch.zeros(self._shape, dtype=torch.float32)
            for rows, y in replies:
                _add_in_float32(total, rows, y)
            return total.to(self._dtype)
        if len(replies) == 2 and replies[1][0] is None:
            return torch.add(replies[0][1], replies[1][1])
        if replies and replies[0][0] is None:
            out, replies = replies[0][1].clone(), replies[1:]
        else:
            out = torch.zeros(self._shape, dtype=self._dtype)
        for rows, y in replies:
            out.index_add_(0, rows, y)
        return out

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._rows.clear()


class Dispatcher:
    """Sends each MoE layer's routed tokens to the expert workers named by `placement`.

    `endpoints` maps every worker id of the placement to its ZMQ address (`tcp://host:port`).
    One DEALER socket per worker; `timeout_s` bounds how long `result()` waits for all replies.
    `kernels`, if given, build each dispatch's messages, read the replies and sum them instead of
    numpy, `wire` and torch.
    """

    def __init__(self, placement: PlacementTable, endpoints: Mapping[int, str], timeout_s: float = 30.0,
                 kernels: DispatchKernels | None = None) -> None:
        missing = sorted(set(range(placement.num_workers)) - set(endpoints))
        if missing:
            raise PlacementError(f"no endpoint for expert worker(s) {missing}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.placement = placement
        self.endpoints = dict(endpoints)
        self.timeout_s = timeout_s
        self.kernels = kernels
        self._replica_table = placement.replica_table()
        self._copy_threshold = zmq.COPY_THRESHOLD  # the sockets' own: smaller frames are copied
        self.counters = DispatcherCounters()
        self._ctx = zmq.Context()
        self._sockets: dict[int, zmq.Socket] = {}
        self._poller = zmq.Poller()
        for worker in range(placement.num_workers):
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)  # a dead worker must not block close()
            sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
            sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
            sock.connect(self.endpoints[worker])
            self._sockets[worker] = sock
            self._poller.register(sock, zmq.POLLIN)
        self._worker_of = {sock: worker for worker, sock in self._sockets.items()}
        # A dropped TCP connection (the worker's process died) fails the dispatches waiting on it at
        # once instead of at the timeout: its replies can no longer arrive.
        self._watch = ConnectionWatch(self._sockets, self._poller)
        self._req_ids = itertools.count()
        # Dispatches whose replies may still arrive; a dropped PendingDispatch leaves on its own.
        self._pending: weakref.WeakValueDictionary[int, PendingDispatch] = weakref.WeakValueDictionary()
        self._closed = False

    def submit(
        self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> PendingDispatch:
        """Send layer `layer`'s pairs without waiting. x [T, H]; topk_ids [T, K] int; topk_weights [T, K]."""
        if self._closed:
            raise RuntimeError("dispatcher is closed")
        if x.dim() != 2 or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
            raise ValueError(f"need x [T, H] and topk_ids [T, K], got {list(x.shape)} and {list(topk_ids.shape)}")
        if topk_weights.shape != topk_ids.shape:
            raise ValueError(f"topk_weights {list(topk_weights.shape)} must match topk_ids {list(topk_ids.shape)}")
        if x.dtype not in wire.HIDDEN_DTYPES.values():
            raise ValueError(f"x dtype {x.dtype} is not one of {sorted(wire.HIDDEN_DTYPES)}")
        num_tokens, k = topk_ids.shape
        pending = PendingDispatch(self, next(self._req_ids), layer, x.shape, x.dtype, x.device)
        if num_tokens == 0 or k == 0:
            return pending

        # The pair bookkeeping is a few hundred integers: numpy does it at a fraction of torch's
        # per-call cost. Pairs are numbered token-major: pair p is (token p // k, slot p % k).
        if topk_ids.dtype != torch.int64 or not topk_ids.is_cpu:
            topk_ids = topk_ids.to(device="cpu", dtype=torch.int64)
        if topk_weights.dtype != torch.float32 or not topk_weights.is_cpu or topk_weights.requires_grad:
            topk_weights = topk_weights.detach().to(device="cpu", dtype=torch.float32)
        x_cpu = x.cpu()
        if self.kernels is not None:
            return self._send_plan(pending, x_cpu, topk_ids, topk_weights)
        expert = topk_ids.numpy().reshape(-1)
        weight = topk_weights.numpy().reshape(-1)
        worker_of_pair = self.placement.pair_workers(topk_ids)
        self._pending[pending.req] = pending
        pair_counts = np.bincount(worker_of_pair, minlength=self.placement.num_workers)
        if pair_counts.max() == expert.size:  # one worker computes every pair
            return self._send_every_pair(pending, int(worker_of_pair[0]), x_cpu, expert, weight, k)

        # Per worker, a mask over the [T, k] pairs: its pairs in token-major order and the tokens
        # it needs, a handful of vector operations whatever the routing.
        worker_of_pair = worker_of_pair.reshape(num_tokens, k)
        weight_bits = weight.view(np.int32)
        for worker, count in enumerate(pair_counts.tolist()):
            if count == 0:
                continue
            mine = worker_of_pair == worker
            pair = np.flatnonzero(mine)
            needed = mine.any(axis=1)
            pairs = np.empty((3, count), dtype=np.int32)
            if np.count_nonzero(needed) >= FULL_BATCH_SHARE * num_tokens:  # x as it is, a pair's row is its token
                rows, x_worker = None, x_cpu
                pairs[0] = pair // k
            else:
                pairs[0] = (np.cumsum(needed) - 1)[pair // k]  # row of each token among those needed
                rows = torch.from_numpy(np.flatnonzero(needed))
                x_worker = x_cpu.index_select(0, rows)
            pairs[1] = expert[pair]
            pairs[2] = weight_bits[pair]
            x_frame = self._x_frame(pending, x_cpu) if rows is None else None
            frames = wire.dispatch_frames(pending.req, pending.layer, x_worker, pairs, x_frame)
            self._send(pending, worker, rows, frames, x_worker.shape[0])
        return pending

    def _send_plan(self, pending: PendingDispatch, x: torch.Tensor, topk_ids: torch.Tensor,
                   topk_weights: torch.Tensor) -> PendingDispatch:
        """Send what `kernels.messages` builds (the numpy path's messages, in one call)."""
        table, counts = self._replica_table
        try:
            messages = self.kernels.messages(x.contiguous(), topk_ids.contiguous(), topk_weights.contiguous(), table,
                                             counts, self.placement.num_workers, FULL_BATCH_SHARE, pending.req,
                                             pending.layer)
        except IndexError as exc:
            raise PlacementError(str(exc).splitlines()[0]) from None
        self._pending[pending.req] = pending
        for worker, header, x_rows, pairs, rows in messages:
            if x_rows is None:
                self._send(pending, worker, None, [header, self._x_frame(pending, x), pairs], x.shape[0])
            else:
                self._send(pending, worker, rows, [header, wire.tensor_frame(x_rows), pairs], x_rows.shape[0])
        return pending

    def _send_every_pair(self, pending: PendingDispatch, worker: int, x: torch.Tensor, expert: np.ndarray,
                         weight: np.ndarray, k: int) -> PendingDispatch:
        """Send x as it is and every pair, in token-major order, to `worker`."""
        pairs = np.empty((3, expert.size), dtype=np.int32)
        pairs[0] = np.arange(x.shape[0], dtype=np.int32).repeat(k)
        pairs[1] = expert
        pairs[2] = weight.view(np.int32)
        frames = wire.dispatch_frames(pending.req, pending.layer, x, pairs, self._x_frame(pending, x))
        self._send(pending, worker, None, frames, x.shape[0])
        return pending

    def close(self) -> None:
        """Close every socket. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._watch.close()
        for sock in self._sockets.values():
            sock.close()
        self._ctx.term()

    def __enter__(self) -> Dispatcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _x_frame(self, pending: PendingDispatch, x: torch.Tensor) -> Any:
        """x's bytes as the one frame every worker sent all of x shares.

        From pyzmq's copy threshold on it is a zero-copy frame: pyzmq releases each through its
        garbage-collector thread, a thread wake-up per frame if every message had its own.
        """
        if pending._x_frame is None:
            frame = wire.tensor_frame(x)
            pending._x_frame = zmq.Frame(frame, copy=False) if frame.nbytes >= self._copy_threshold else frame
        return pending._x_frame

    def _send(self, pending: PendingDispatch, worker: int, rows: torch.Tensor | None, frames: list[Any],
              tokens: int) -> None:
        """Send one dispatch message (`wire.dispatch_frames`: header, x, pairs) of `tokens` rows."""
        try:
            # NOBLOCK: a worker that stopped reading fills its queue; fail rather than hang.
            self._sockets[worker].send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self._pending.pop(pending.req, None)
            self.counters.record_timeout()
            raise DispatchTimeout(
                f"layer {pending.layer}: send queue to expert worker {worker} at {self.endpoints[worker]} is full "
                f"({HWM_MESSAGES} messages); the worker is not reading"
            ) from None
        pending._rows[worker] = rows
        pending._sent_s[worker] = time.perf_counter()
        self.counters.record_send(pending.layer, worker, tokens, memoryview(frames[2]).nbytes // wire.PAIR_BYTES,
                                  wire.nbytes(frames))

    def _collect(self, pending: PendingDispatch) -> None:
        """Read replies (for this or any other live dispatch) until `pending` has all of its own."""
        while pending._rows:
            if self._watch.lost:
                self._watch.refresh()  # a lost worker may have come back meanwhile
                if self._fail_if_lost(pending):
                    return
            remaining_s = pending._deadline_s - time.monotonic()
            if remaining_s <= 0:
                self._pending.pop(pending.req, None)
                self.counters.record_timeout()
                late = ", ".join(f"worker {w} at {self.endpoints[w]}" for w in pending.waiting_for)
                pending._fail(DispatchTimeout(f"layer {pending.layer}: no reply within {self.timeout_s} s from {late}"))
                return
            # One message per readable socket, then poll again: cheaper than reading until zmq.Again.
            for sock, _ in self._poller.poll(remaining_s * 1000):
                if not self._watch.owns(sock):
                    self._receive(sock)
                elif self._watch.read(sock):
                    for owner in list(self._pending.values()):
                        self._fail_if_lost(owner)
        self._pending.pop(pending.req, None)

    def _fail_if_lost(self, pending: PendingDispatch) -> bool:
        lost = sorted(self._watch.lost.intersection(pending._rows))
        if not lost:
            return False
        self._pending.pop(pending.req, None)
        names = ", ".join(f"{w} at {self.endpoints[w]}" for w in lost)
        pending._fail(ExpertWorkerLost(f"layer {pending.layer}: the connection to expert worker {names} "
                                       "dropped before it replied"))
        return True

    def _receive(self, sock: zmq.Socket) -> None:
        worker = self._worker_of[sock]
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return
        received_s = time.perf_counter()
        fast = None if self.kernels is None else self.kernels.decode_result(frames)
        try:
            msg = wire.decode(frames) if fast is None else wire.Result(*fast)
        except WireError as exc:  # whose reply it was cannot be told: fail every dispatch waiting on the worker
            self.counters.record_remote_error()
            error = f"expert worker {worker} at {self.endpoints[worker]} sent a malformed reply ({exc})"
            for owner in [p for p in self._pending.values() if worker in p._rows]:
                self._pending.pop(owner.req, None)
                owner._fail(RemoteExpertError(f"layer {owner.layer}: {error}"))
            return
        owner = self._pending.get(msg.req)
        if owner is None or worker not in owner._rows:
            self.counters.record_stale_reply()  # e.g. the reply to a dispatch that timed out
            return
        self.counters.record_reply(msg.layer, worker, wire.nbytes(frames), received_s - owner._sent_s[worker])
        owner._accept(worker, msg)
        if isinstance(msg, wire.ErrorReply):
            self.counters.record_remote_error()
        if owner._error is not None:
            self._pending.pop(owner.req, None)
