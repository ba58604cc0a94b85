from collections.abc import Iterator

import msgpack
import numpy as np
import pytest
import torch
import zmq

from router import wire
from router.errors import WireError

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def dispatch(dtype: torch.dtype, rows: int = 5, hidden: int = 8, pairs: int = 7) -> wire.Dispatch:
    gen = torch.Generator().manual_seed(rows * 100 + pairs)
    return wire.Dispatch(
        req=42,
        layer=3,
        x=torch.randn(rows, hidden, generator=gen).to(dtype),
        pair_token=torch.randint(0, max(rows, 1), (pairs,), generator=gen, dtype=torch.int32),
        pair_expert=torch.randint(0, 160, (pairs,), generator=gen, dtype=torch.int32),
        pair_weight=torch.rand(pairs, generator=gen),
    )


def assert_same_dispatch(got: wire.Message, want: wire.Dispatch) -> None:
    assert isinstance(got, wire.Dispatch)
    assert (got.req, got.layer) == (want.req, want.layer)
    for name in ("x", "pair_token", "pair_expert", "pair_weight"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    for sock in (server, client):
        sock.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    client.connect(f"tcp://127.0.0.1:{port}")
    yield client, server
    client.close()
    server.close()
    ctx.term()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,pairs", [(5, 7), (0, 0), (3, 0)])
def test_dispatch_round_trip_in_process(dtype: torch.dtype, rows: int, pairs: int) -> None:
    msg = dispatch(dtype, rows=rows, pairs=pairs)
    assert_same_dispatch(wire.decode(wire.encode(msg)), msg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_and_result_over_tcp(dtype: torch.dtype, pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    client, server = pair
    msg = dispatch(dtype, rows=300, hidden=64, pairs=900)  # above pyzmq's zero-copy threshold
    client.send_multipart(wire.encode(msg), copy=False)
    identity, *frames = server.recv_multipart(copy=False)
    assert_same_dispatch(wire.decode(frames), msg)

    result = wire.Result(req=42, layer=3, y=msg.x * 2)
    server.send_multipart([identity, *wire.encode(result)], copy=False)
    got = wire.decode(client.recv_multipart(copy=False))
    assert isinstance(got, wire.Result) and got.y.dtype == dtype and torch.equal(got.y, result.y)


def test_result_and_error_round_trip() -> None:
    empty = wire.Result(req=1, layer=2, y=torch.empty(0, 16, dtype=torch.bfloat16))
    got = wire.decode(wire.encode(empty))
    assert isinstance(got, wire.Result) and got.y.shape == (0, 16) and got.y.dtype == torch.bfloat16
    err = wire.ErrorReply(req=5, layer=9, reason="KeyError: layer 9")
    assert wire.decode(wire.encode(err)) == err


def test_tensor_frames_share_memory_with_the_tensor() -> None:
    msg = dispatch(torch.bfloat16)
    frames = wire.encode(msg)
    assert np.asarray(frames[1]).ctypes.data == msg.x.data_ptr()
    assert len(frames) == 5 and msgpack.unpackb(frames[0])["dtype"] == "bfloat16"


def test_encode_rejects_unsupported_hidden_dtype() -> None:
    with pytest.raises(WireError, match="hidden dtype torch.float64"):
        wire.encode(wire.Result(req=1, layer=0, y=torch.zeros(2, 2, dtype=torch.float64)))


def good_frames() -> list:
    return list(wire.encode(dispatch(torch.float32, rows=4, hidden=8, pairs=6)))


def with_header(frames: list, **changes: object) -> list:
    header = msgpack.unpackb(frames[0])
    for key, value in changes.items():
        if value is None:
            del header[key]
        else:
            header[key] = value
    return [msgpack.packb(header), *frames[1:]]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda f: [], "no header frame"),
        (lambda f: [b"\xc1\xc1garbage", *f[1:]], "header frame is not msgpack"),
        (lambda f: [msgpack.packb([1, 2]), *f[1:]], "header must be a map"),
        (lambda f: with_header(f, v=99), "wire version 99 is not 1"),
        (lambda f: with_header(f, v=None), "wire version None"),
        (lambda f: with_header(f, kind="ping"), "unknown message kind 'ping'"),
        (lambda f: with_header(f, req=None), "field 'req' is missing"),
        (lambda f: with_header(f, layer="3"), "field 'layer' is missing or not an int"),
        (lambda f: with_header(f, dtype="float64"), "dtype 'float64' is not one of"),
        (lambda f: with_header(f, dtype=None), "dtype None is not one of"),
        (lambda f: with_header(f, shapes=None), "field 'shapes' is missing"),
        (lambda f: with_header(f, shapes=[[4, -8], [6], [6], [6]]), "not a list of shapes"),
        (lambda f: f[:-1], "has 3 tensor frame\\(s\\) but 4 shape\\(s\\)"),
        (lambda f: [*f, b"extra"], "has 5 tensor frame\\(s\\) but 4 shape\\(s\\)"),
        (lambda f: [f[0], bytes(memoryview(f[1]))[:-4], *f[2:]], "frame x has 124 bytes, expected 128"),
        (lambda f: [*f[:4], b"\x00" * 8], "frame pair_weight has 8 bytes, expected 24"),
        (lambda f: with_header(f, shapes=[[4, 8], [6], [6], [5]]), "pair tensors differ in length"),
        (lambda f: with_header(f, shapes=[[32], [6], [6], [6]]), "expects tensors of ranks"),
        (lambda f: with_header(f, kind="error"), "'reason' is missing"),
        (lambda f: with_header(f, kind="error", reason="boom"), "error message carries 4 tensor frame"),
    ],
)
def test_malformed_messages_raise_wire_error(make, message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.decode(make(good_frames()))


def test_pair_token_outside_rows_is_rejected() -> None:
    msg = dispatch(torch.float32, rows=4, pairs=3)
    bad = wire.Dispatch(
        msg.req, msg.layer, msg.x, torch.tensor([0, 4, 1], dtype=torch.int32), msg.pair_expert, msg.pair_weight
    )
    with pytest.raises(WireError, match="pair_token outside the 4 rows") as info:
        wire.decode(wire.encode(bad))
    assert (info.value.req, info.value.layer) == (42, 3)


def test_wire_error_carries_request_id_once_header_names_it() -> None:
    with pytest.raises(WireError) as info:
        wire.decode(with_header(good_frames(), dtype="int8"))
    assert (info.value.req, info.value.layer) == (42, 3)
