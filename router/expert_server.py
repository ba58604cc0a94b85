"""Serve loop of an expert worker: answer dispatches from any number of attention workers.

A ROUTER socket receives `dispatch` messages from the dispatchers' DEALER sockets, calls the
`compute` function the expert worker supplies (its grouped SwiGLU over the experts it holds),
and replies with one `result` (or one `error`) per dispatch. It runs on its own thread; a bad
message or a failing compute yields an error reply and a log line, never a dead server.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import zmq

from router import wire
from router.counters import ServerCounters
from router.errors import WireError
from router.socket_server import RouterSocketServer

log = logging.getLogger(__name__)

ComputeFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""compute(layer, x [n, H], pair_token [P] int32, pair_expert [P] int32, pair_weight [P] float32) -> y [n, H].

Raise KeyError or ValueError for a layer or expert this worker does not hold."""

# Errors that mean "this request is bad"; anything else is a bug in compute, logged with a traceback.
_REJECTED = (WireError, KeyError, ValueError, IndexError)


class ExpertServer(RouterSocketServer):
    """ROUTER socket bound on `bind_host:port` (0 picks a free port; see `endpoint`), served by a thread.

    `num_experts` is the global expert count, used to reject out-of-range ids and to size
    `counters.tokens_per_expert`. `decode_dispatch`, if given, reads each message first (the expert
    worker passes the C++ one); `wire.decode` reads what it leaves. Use as a context manager, or
    call `start()` and `stop()`.
    """

    def __init__(self, compute: ComputeFn, num_experts: int, bind_host: str = "127.0.0.1", port: int = 0,
                 decode_dispatch: wire.DecodeDispatch | None = None) -> None:
        self._compute = compute
        self.num_experts = num_experts
        self._decode_dispatch = decode_dispatch
        self.counters = ServerCounters(num_experts)
        super().__init__("expert-server", bind_host, port)

    def handle(self, frames: list[zmq.Frame]) -> list[wire.Frame]:
        req = layer = -1
        try:
            # Both readers check the expert ids too: compute (and the counters) may index with them.
            fast = None if self._decode_dispatch is None else self._decode_dispatch(frames, self.num_experts)
            if fast is not None:
                req, layer, x, pair_token, pair_expert, pair_weight = fast
            else:  # no native reader, or a message it leaves to decode (which names what is wrong)
                msg = wire.decode(frames, self.num_experts)
                req, layer = msg.req, msg.layer
                if not isinstance(msg, wire.Dispatch):
                    raise WireError(f"expert server accepts dispatch messages, got {type(msg).__name__}")
                x, pair_token, pair_expert, pair_weight = msg.x, msg.pair_token, msg.pair_expert, msg.pair_weight
            y = self._compute(layer, x, pair_token, pair_expert, pair_weight)
            if y.shape != x.shape:
                raise ValueError(f"compute returned shape {list(y.shape)}, expected {list(x.shape)}")
            out = wire.encode(wire.Result(req, layer, y if y.dtype == x.dtype else y.to(x.dtype)))
        except WireError as exc:
            out = self._reject(req if exc.req is None else exc.req, layer if exc.layer is None else exc.layer, exc)
        except Exception as exc:  # a failing request must not take the server down
            out = self._reject(req, layer, exc)
        else:
            # counted once the reply is on its way (after_reply): not on the round trip
            self.counters.record_later(layer, pair_expert, x.shape[0], frames, out)
        return out

    def after_reply(self) -> None:
        self.counters.flush()

    def _reject(self, req: int, layer: int, exc: Exception) -> list[wire.Frame]:
        """Count, log one line (a traceback for unexpected errors) and build the error reply."""
        self.counters.record_error()
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, _REJECTED):
            log.warning("expert server %s rejected request %s layer %s: %s", self.endpoint, req, layer, reason)
        else:
            log.exception("expert server %s failed on request %s layer %s", self.endpoint, req, layer)
        return wire.encode(wire.ErrorReply(req, layer, reason))
