"""Wire format of the per-layer dispatch between an attention worker and an expert worker.

A message is a ZMQ multipart: frame 0 is a msgpack header, the following frames are raw tensor
bytes (C order). Tensors leave as zero-copy views of their storage and arrive as `torch.frombuffer`
views of the received frames. Nothing is pickled.

    dispatch: header [v, "dispatch", req, layer, dtype, n, H, P], then frames
              x [n, H] (dtype named by the header) and
              pairs [3, P] int32, the per-pair vectors in one frame: row 0 pair_token (row of x),
              row 1 pair_expert (global expert id), row 2 pair_weight (float32, as its bits)
    result:   header [v, "result", req, layer, dtype, n, H], then y [n, H]: per row of x, the
              weighted sum over its pairs
    error:    header [v, "error", req, layer, reason]; no tensors

The header is a msgpack array (a compact struct: no key strings to pack or look up) whose first
item is the version. `decode` checks every field, the frame count and byte sizes, and bounds the
pair rows (and, given the expert count, the expert ids) with one reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

from router.errors import WireError

WIRE_VERSION = 2

PAIR_BYTES = 12  # one pair in a dispatch's pairs frame: three int32 (row of x, expert id, weight bits)

HIDDEN_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in HIDDEN_DTYPES.items()}


def pack_pairs(pair_token: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    """The [3, P] int32 pairs of a Dispatch from its three vectors (weights stored as float32 bits)."""
    pairs = torch.empty(3, pair_token.numel(), dtype=torch.int32)
    pairs[0] = pair_token
    pairs[1] = pair_expert
    pairs[2].view(torch.float32).copy_(pair_weight)
    return pairs


# Plain slotted dataclasses: built for every message, and a frozen one costs a setattr per field.
@dataclass(slots=True)
class Dispatch:
    req: int
    layer: int
    x: torch.Tensor  # [n, H]
    pairs: torch.Tensor  # [3, P] int32, see pack_pairs

    @property
    def pair_token(self) -> torch.Tensor:
        """[P] int32: the row of x of each pair."""
        return self.pairs[0]

    @property
    def pair_expert(self) -> torch.Tensor:
        """[P] int32: the global expert id of each pair."""
        return self.pairs[1]

    @property
    def pair_weight(self) -> torch.Tensor:
        """[P] float32: the routing weight of each pair."""
        return self.pairs[2].view(torch.float32)


@dataclass(slots=True)
class Result:
    req: int
    layer: int
    y: torch.Tensor


@dataclass(slots=True)
class ErrorReply:
    req: int
    layer: int
    reason: str


Message = Dispatch | Result | ErrorReply
Frame = bytes | memoryview

DecodeDispatch = Callable[[Sequence[Any], int],
                          tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None]
"""decode_dispatch(frames, num_experts) -> (req, layer, x, pair_token, pair_expert, pair_weight) or None:
a native reader of a dispatch for the expert server's hot path (``workers.cpu_kernels``). For a
dispatch that ``decode(frames, num_experts)`` reads it returns the same values, or None for one it
leaves to decode (an empty x, say); for every other message, None. The caller then calls decode,
which reads the message or names what is wrong."""

DecodeResult = Callable[[Sequence[Any]], tuple[int, int, torch.Tensor] | None]
"""decode_result(frames) -> (req, layer, y) or None: the same for a result, on the dispatcher's side."""


def encode(msg: Message) -> list[Frame]:
    """Frames for `socket.send_multipart(frames, copy=False)`; tensor frames share tensor memory."""
    if isinstance(msg, ErrorReply):
        return [msgpack.packb([WIRE_VERSION, "error", msg.req, msg.layer, msg.reason])]
    if isinstance(msg, Dispatch):
        pairs = msg.pairs
        if pairs.dtype != torch.int32 or pairs.dim() != 2 or pairs.shape[0] != 3:
            raise WireError(f"dispatch pairs must be [3, P] int32, got {pairs.dtype} {list(pairs.shape)}",
                            msg.req, msg.layer)
        return dispatch_frames(msg.req, msg.layer, msg.x, tensor_frame(pairs))
    dtype_name, rows, hidden_size = _hidden_header(msg.y, msg.req, msg.layer)
    return [msgpack.packb([WIRE_VERSION, "result", msg.req, msg.layer, dtype_name, rows, hidden_size]),
            tensor_frame(msg.y)]


def dispatch_frames(req: int, layer: int, x: torch.Tensor, pairs: np.ndarray | memoryview,
                    x_frame: Any = None) -> list[Any]:
    """The frames of a dispatch whose pairs are already [3, P] int32 bytes in C order.

    The dispatcher builds the pairs in numpy and sends them through here, without a Dispatch.
    `x_frame`, if given, stands for x's bytes (a zmq.Frame of `tensor_frame(x)` that several
    messages share).
    """
    dtype_name, rows, hidden_size = _hidden_header(x, req, layer)
    pairs = memoryview(pairs)
    if pairs.format != "i" or pairs.ndim != 2 or pairs.shape[0] != 3 or not pairs.c_contiguous:
        raise WireError(f"dispatch pairs must be [3, P] int32 in C order, got format {pairs.format!r} "
                        f"shape {list(pairs.shape)}", req, layer)
    header = [WIRE_VERSION, "dispatch", req, layer, dtype_name, rows, hidden_size, pairs.shape[1]]
    return [msgpack.packb(header), tensor_frame(x) if x_frame is None else x_frame, pairs]


def _hidden_header(hidden: torch.Tensor, req: int, layer: int) -> tuple[str, int, int]:
    dtype_name = _DTYPE_NAMES.get(hidden.dtype)
    if dtype_name is None:
        raise WireError(f"hidden dtype {hidden.dtype} is not one of {sorted(HIDDEN_DTYPES)}", req, layer)
    if hidden.dim() != 2:
        raise WireError(f"hidden tensor must be [n, H], got shape {list(hidden.shape)}", req, layer)
    rows, hidden_size = hidden.shape
    return dtype_name, rows, hidden_size


def decode(frames: Sequence[Any], num_experts: int | None = None) -> Message:
    """Parse a multipart message (bytes, memoryviews or zmq.Frame objects); raise WireError if malformed.

    A dispatch's pair rows must lie in x; given `num_experts`, its expert ids in 0..num_experts-1.
    """
    if not frames:
        raise WireError("empty message: no header frame")
    try:
        header = msgpack.unpackb(frames[0])
    except Exception as exc:  # msgpack raises several unrelated types on garbage input
        raise WireError(f"header frame is not msgpack ({type(exc).__name__}: {exc})") from None
    # The common case in one test; anything else is sorted out, with a precise error, by _check_header.
    kind = header[1] if type(header) is list and len(header) > 4 and header[0] == WIRE_VERSION else None
    if kind == "dispatch" and len(header) == 8 and len(frames) == 3:
        _, _, req, layer, dtype_name, rows, hidden_size, num_pairs = header
        if not (_hidden_fields_ok(req, layer, dtype_name, rows, hidden_size)
                and type(num_pairs) is int and num_pairs >= 0):
            _check_header(header, frames)
        x = _tensor(frames[1], rows, hidden_size, HIDDEN_DTYPES[dtype_name], "x", req, layer)
        pairs = _tensor(frames[2], 3, num_pairs, torch.int32, "pairs", req, layer)
        if num_pairs:
            # One reduction bounds rows and expert ids: as uint32 a negative int32 is above any bound.
            checked = 1 if num_experts is None else 2
            top = np.frombuffer(frames[2], np.uint32, checked * num_pairs).reshape(checked, -1).max(1).tolist()
            top_row, *top_expert = top
            if top_row >= rows:
                raise WireError(f"dispatch pair_token outside the {rows} rows of x", req, layer)
            if top_expert and top_expert[0] >= num_experts:
                lo, hi = (int(v) for v in torch.aminmax(pairs[1]))
                raise WireError(f"dispatch expert ids {lo}..{hi} outside 0..{num_experts - 1}", req, layer)
        return Dispatch(req, layer, x, pairs)
    if kind == "result" and len(header) == 7 and len(frames) == 2:
        _, _, req, layer, dtype_name, rows, hidden_size = header
        if not _hidden_fields_ok(req, layer, dtype_name, rows, hidden_size):
            _check_header(header, frames)
        return Result(req, layer, _tensor(frames[1], rows, hidden_size, HIDDEN_DTYPES[dtype_name], "y", req, layer))
    if kind == "error" and len(header) == 5 and len(frames) == 1:
        _, _, req, layer, reason = header
        if not (type(req) is int and type(layer) is int and type(reason) is str):
            _check_header(header, frames)
        return ErrorReply(req, layer, reason)
    _check_header(header, frames)
    raise AssertionError("unreachable: _check_header accepted a header decode rejected")


def _hidden_fields_ok(req: Any, layer: Any, dtype_name: Any, rows: Any, hidden_size: Any) -> bool:
    """The fast test of the fields a dispatch and a result header share; ``_check_header`` names a failure."""
    return (type(req) is int and type(layer) is int and type(rows) is int and type(hidden_size) is int
            and rows >= 0 and hidden_size >= 0 and type(dtype_name) is str and dtype_name in HIDDEN_DTYPES)


def nbytes(frames: Sequence[Any]) -> int:
    """Total payload size of a multipart message, for the byte counters."""
    return sum(memoryview(f).nbytes for f in frames)


def tensor_frame(t: torch.Tensor) -> memoryview:
    """A tensor's bytes as a frame: a view of its memory (a copy only if it is not contiguous on the CPU)."""
    if not t.is_cpu or not t.is_contiguous():
        t = t.cpu().contiguous()
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the same bytes as int16 will do
        t = t.view(torch.int16)
    return memoryview(t.numpy())


def _tensor(frame: Any, rows: int, cols: int, dtype: torch.dtype, name: str, req: int, layer: int) -> torch.Tensor:
    buf = memoryview(frame)
    if buf.nbytes != rows * cols * dtype.itemsize:
        raise WireError(f"frame {name} has {buf.nbytes} bytes, expected {rows * cols * dtype.itemsize} for "
                        f"shape [{rows}, {cols}] of {dtype}", req, layer)
    if buf.nbytes == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(rows, cols, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(rows, cols)


_FIELDS = {
    "dispatch": ("req", "layer", "dtype", "rows", "hidden", "pairs"),
    "result": ("req", "layer", "dtype", "rows", "hidden"),
    "error": ("req", "layer", "reason"),
}
_TENSOR_FRAMES = {"dispatch": 2, "result": 1, "error": 0}


def _check_header(header: Any, frames: Sequence[Any]) -> None:
    """Raise the WireError that says what is wrong with a header decode's fast test refused."""
    if type(header) is not list:
        raise WireError(f"header must be an array, got {type(header).__name__}")
    version = header[0] if header else None
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version!r} is not {WIRE_VERSION}")
    kind = header[1] if len(header) > 1 else None
    if kind not in _FIELDS:
        raise WireError(f"unknown message kind {kind!r}")
    values = dict(zip(_FIELDS[kind], header[2:], strict=False))
    req, layer = values.get("req"), values.get("layer")
    for name in ("req", "layer"):
        if type(values.get(name)) is not int:
            raise WireError(f"{kind} header field {name!r} is missing or not an int", req if type(req) is int else None)
    if len(header) != 2 + len(_FIELDS[kind]):
        raise WireError(f"{kind} header has {len(header)} items, expected {2 + len(_FIELDS[kind])}: "
                        f"v, kind, {', '.join(_FIELDS[kind])}", req, layer)
    if len(frames) != 1 + _TENSOR_FRAMES[kind]:
        raise WireError(f"{kind} message has {len(frames)} frame(s), expected {1 + _TENSOR_FRAMES[kind]}", req, layer)
    if kind == "error":
        raise WireError("error header field 'reason' is not a string", req, layer)
    if type(values["dtype"]) is not str or values["dtype"] not in HIDDEN_DTYPES:
        raise WireError(f"{kind} header dtype {values['dtype']!r} is not one of {sorted(HIDDEN_DTYPES)}", req, layer)
    for name in _FIELDS[kind][3:]:
        if type(values[name]) is not int or values[name] < 0:
            raise WireError(f"{kind} header field {name!r} is not a count: {values[name]!r}", req, layer)
