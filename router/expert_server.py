"""Serve loop of an expert worker: answer dispatches from any number of attention workers.

A ROUTER socket receives `dispatch` messages from the dispatchers' DEALER sockets, calls the
`compute` function the expert worker supplies (its grouped SwiGLU over the experts it holds),
and replies with one `result` (or one `error`) per dispatch. It runs on its own thread; a bad
message or a failing compute yields an error reply and a log line, never a dead server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

import torch
import zmq

from router import wire
from router.counters import ServerCounters
from router.errors import WireError

log = logging.getLogger(__name__)

ComputeFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""compute(layer, x [n, H], pair_token [P] int32, pair_expert [P] int32, pair_weight [P] float32) -> y [n, H].

Raise KeyError or ValueError for a layer or expert this worker does not hold."""

HWM_MESSAGES = 1024
# Errors that mean "this request is bad"; anything else is a bug in compute, logged with a traceback.
_REJECTED = (WireError, KeyError, ValueError, IndexError)


class ExpertServer:
    """ROUTER socket bound on `bind_host:port` (0 picks a free port; see `endpoint`), served by a thread.

    `num_experts` is the global expert count, used to reject out-of-range ids and to size
    `counters.tokens_per_expert`. Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, compute: ComputeFn, num_experts: int, bind_host: str = "127.0.0.1", port: int = 0) -> None:
        self._compute = compute
        self.num_experts = num_experts
        self.counters = ServerCounters(num_experts)
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
        self._socket.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
        self._socket.bind(f"tcp://{bind_host}:{port}")
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        # stop() wakes the serving thread through this inproc pair instead of a polling interval.
        wake = f"inproc://expert-server-wake-{id(self)}"
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        self._wake_recv.bind(wake)
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_send.connect(wake)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> ExpertServer:
        with self._lock:
            if self._stopped:
                raise RuntimeError(f"expert server {self.endpoint} was stopped; create a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=f"expert-server {self.endpoint}", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, close the sockets and join the thread. Safe to call more than once."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            if self._thread is not None:
                self._wake_send.send(b"")
                self._thread.join()
            else:
                self._socket.close()
                self._wake_recv.close()
            self._wake_send.close()
            self._ctx.term()

    def __enter__(self) -> ExpertServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_recv in ready:
                    return
                # One message per poll: cheaper than reading until zmq.Again.
                frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
                self._handle(frames[0], frames[1:])
        finally:
            self._socket.close()
            self._wake_recv.close()

    def _handle(self, identity: zmq.Frame, frames: list[zmq.Frame]) -> None:
        req = layer = -1
        try:
            msg = wire.decode(frames)
            req, layer = msg.req, msg.layer
            if not isinstance(msg, wire.Dispatch):
                raise WireError(f"expert server accepts dispatch messages, got {type(msg).__name__}")
            out = wire.encode(self._serve_dispatch(msg))
        except WireError as exc:
            out = self._reject(req if exc.req is None else exc.req, layer if exc.layer is None else exc.layer, exc)
        except Exception as exc:  # a failing request must not take the server down
            out = self._reject(req, layer, exc)
        else:
            self.counters.record(layer, msg.pair_expert, msg.x.shape[0], wire.nbytes(frames), wire.nbytes(out))
        self._socket.send_multipart([identity, *out], copy=False)

    def _serve_dispatch(self, msg: wire.Dispatch) -> wire.Result:
        # The one check of the expert ids: compute (and the counters) may index with them.
        if msg.pair_expert.numel():
            lo, hi = (int(v) for v in torch.aminmax(msg.pair_expert))
            if lo < 0 or hi >= self.num_experts:
                raise ValueError(f"expert ids {lo}..{hi} outside 0..{self.num_experts - 1}")
        y = self._compute(msg.layer, msg.x, msg.pair_token, msg.pair_expert, msg.pair_weight)
        if tuple(y.shape) != tuple(msg.x.shape):
            raise ValueError(f"compute returned shape {list(y.shape)}, expected {list(msg.x.shape)}")
        return wire.Result(msg.req, msg.layer, y.to(msg.x.dtype))

    def _reject(self, req: int, layer: int, exc: Exception) -> list[wire.Frame]:
        """Count, log one line (a traceback for unexpected errors) and build the error reply."""
        self.counters.record_error()
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, _REJECTED):
            log.warning("expert server %s rejected request %s layer %s: %s", self.endpoint, req, layer, reason)
        else:
            log.exception("expert server %s failed on request %s layer %s", self.endpoint, req, layer)
        return wire.encode(wire.ErrorReply(req, layer, reason))
