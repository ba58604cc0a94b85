"""Wire format of the per-layer dispatch between an attention worker and an expert worker.

A message is a ZMQ multipart: frame 0 is a msgpack header, the following frames are raw tensor
bytes (C order), one per entry of `header["shapes"]`. Tensors leave as zero-copy views of their
storage and arrive as `torch.frombuffer` views of the received frames. Nothing is pickled.

    dispatch: x [n, H] (dtype from the header), pair_token [P] int32 (row of x),
              pair_expert [P] int32 (global expert id), pair_weight [P] float32
    result:   y [n, H] (dtype from the header): per row of x, the weighted sum over its pairs
    error:    no tensors; `reason` says what went wrong
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from router.errors import WireError

WIRE_VERSION = 1

HIDDEN_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in HIDDEN_DTYPES.items()}
# Fixed dtypes of the dispatch's pair tensors (frames 2..4).
_PAIR_DTYPES = (torch.int32, torch.int32, torch.float32)


@dataclass(frozen=True)
class Dispatch:
    req: int
    layer: int
    x: torch.Tensor
    pair_token: torch.Tensor
    pair_expert: torch.Tensor
    pair_weight: torch.Tensor


@dataclass(frozen=True)
class Result:
    req: int
    layer: int
    y: torch.Tensor


@dataclass(frozen=True)
class ErrorReply:
    req: int
    layer: int
    reason: str


Message = Dispatch | Result | ErrorReply
Frame = bytes | memoryview


def encode(msg: Message) -> list[Frame]:
    """Frames for `socket.send_multipart(frames, copy=False)`; tensor frames share tensor memory."""
    if isinstance(msg, ErrorReply):
        header = _header("error", msg.req, msg.layer, shapes=[])
        header["reason"] = msg.reason
        return [msgpack.packb(header)]
    if isinstance(msg, Dispatch):
        kind, hidden = "dispatch", msg.x
        tensors = [
            msg.x,
            *(
                t if t.dtype == dtype else t.to(dtype)
                for t, dtype in zip((msg.pair_token, msg.pair_expert, msg.pair_weight), _PAIR_DTYPES, strict=True)
            ),
        ]
    else:
        kind, hidden = "result", msg.y
        tensors = [msg.y]
    if hidden.dtype not in _DTYPE_NAMES:
        raise WireError(f"hidden dtype {hidden.dtype} is not one of {sorted(HIDDEN_DTYPES)}", msg.req, msg.layer)
    header = _header(kind, msg.req, msg.layer, shapes=[list(t.shape) for t in tensors])
    header["dtype"] = _DTYPE_NAMES[hidden.dtype]
    return [msgpack.packb(header), *(_tensor_bytes(t) for t in tensors)]


def decode(frames: Sequence[Any]) -> Message:
    """Parse a multipart message (bytes, memoryviews or zmq.Frame objects); raise WireError if malformed."""
    if not frames:
        raise WireError("empty message: no header frame")
    try:
        header = msgpack.unpackb(memoryview(frames[0]))
    except Exception as exc:  # msgpack raises several unrelated types on garbage input
        raise WireError(f"header frame is not msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != WIRE_VERSION:
        raise WireError(f"wire version {header.get('v')!r} is not {WIRE_VERSION}")
    kind = header.get("kind")
    if kind not in ("dispatch", "result", "error"):
        raise WireError(f"unknown message kind {kind!r}")
    req, layer = header.get("req"), header.get("layer")
    for name, value in (("req", req), ("layer", layer)):
        if not isinstance(value, int):
            raise WireError(f"{kind} header field {name!r} is missing or not an int", _int_or_none(req))
    if kind == "error":
        reason = header.get("reason")
        if not isinstance(reason, str):
            raise WireError("error header field 'reason' is missing or not a string", req, layer)
        if len(frames) != 1:
            raise WireError(f"error message carries {len(frames) - 1} tensor frame(s), expected none", req, layer)
        return ErrorReply(req, layer, reason)

    dtype_name = header.get("dtype")
    if dtype_name not in HIDDEN_DTYPES:
        raise WireError(f"{kind} header dtype {dtype_name!r} is not one of {sorted(HIDDEN_DTYPES)}", req, layer)
    shapes = header.get("shapes")
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes
    ):
        raise WireError(f"{kind} header field 'shapes' is missing or not a list of shapes", req, layer)
    if len(frames) - 1 != len(shapes):
        raise WireError(f"{kind} has {len(frames) - 1} tensor frame(s) but {len(shapes)} shape(s)", req, layer)
    hidden = HIDDEN_DTYPES[dtype_name]
    if kind == "result":
        _check_ranks(kind, shapes, [2], req, layer)
        return Result(req, layer, _tensor(frames[1], shapes[0], hidden, "y", req, layer))

    _check_ranks(kind, shapes, [2, 1, 1, 1], req, layer)
    if not shapes[1] == shapes[2] == shapes[3]:
        raise WireError(f"dispatch pair tensors differ in length: {shapes[1:]}", req, layer)
    names = ("pair_token", "pair_expert", "pair_weight")
    x = _tensor(frames[1], shapes[0], hidden, "x", req, layer)
    pairs = [
        _tensor(f, s, d, n, req, layer) for f, s, d, n in zip(frames[2:], shapes[1:], _PAIR_DTYPES, names, strict=True)
    ]
    pair_token = pairs[0]
    if pair_token.numel():
        lo, hi = torch.aminmax(pair_token)
        if int(lo) < 0 or int(hi) >= x.shape[0]:
            raise WireError(f"dispatch pair_token outside the {x.shape[0]} rows of x", req, layer)
    return Dispatch(req, layer, x, *pairs)


def nbytes(frames: Sequence[Any]) -> int:
    """Total payload size of a multipart message, for the byte counters."""
    return sum(memoryview(f).nbytes for f in frames)


def _header(kind: str, req: int, layer: int, shapes: list[list[int]]) -> dict[str, Any]:
    return {"v": WIRE_VERSION, "kind": kind, "req": req, "layer": layer, "shapes": shapes}


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of the tensor's memory (a copy only if it is not contiguous on the CPU)."""
    if not t.is_cpu or not t.is_contiguous():
        t = t.cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the same bytes as int16 will do
        t = t.view(torch.int16)
    return memoryview(t.detach().numpy()).cast("B") if t.numel() else memoryview(b"")


def _tensor(frame: Any, shape: list[int], dtype: torch.dtype, name: str, req: int, layer: int) -> torch.Tensor:
    buf = memoryview(frame)
    numel = 1
    for d in shape:
        numel *= d
    expected_bytes = numel * dtype.itemsize
    if buf.nbytes != expected_bytes:
        raise WireError(
            f"frame {name} has {buf.nbytes} bytes, expected {expected_bytes} for shape {shape} of {dtype}", req, layer
        )
    if numel == 0:  # torch.frombuffer refuses empty buffers
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(buf, dtype=dtype)
    return flat if len(shape) == 1 else flat.view(shape)


def _check_ranks(kind: str, shapes: list[list[int]], ranks: list[int], req: int, layer: int) -> None:
    if [len(s) for s in shapes] != ranks:
        raise WireError(f"{kind} expects tensors of ranks {ranks}, got shapes {shapes}", req, layer)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None
