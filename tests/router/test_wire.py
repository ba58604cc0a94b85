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
        pairs=wire.pack_pairs(
            torch.randint(0, max(rows, 1), (pairs,), generator=gen),
            torch.randint(0, 160, (pairs,), generator=gen),
            torch.rand(pairs, generator=gen),
        ),
    )


def assert_same_dispatch(got: wire.Message, want: wire.Dispatch) -> None:
    assert isinstance(got, wire.Dispatch)
    assert (got.req, got.layer) == (want.req, want.layer)
    for name in ("x", "pairs", "pair_token", "pair_expert", "pair_weight"):
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
    assert np.asarray(frames[2]).ctypes.data == msg.pairs.data_ptr()
    assert len(frames) == 3 and msgpack.unpackb(frames[0])[4] == "bfloat16"


def test_pairs_pack_three_vectors_into_one_frame() -> None:
    token, expert, weight = torch.tensor([2, 0, 1]), torch.tensor([7, 5, 127]), torch.tensor([0.5, 0.25, 0.125])
    msg = wire.Dispatch(req=1, layer=2, x=torch.zeros(3, 4), pairs=wire.pack_pairs(token, expert, weight))
    got = wire.decode(wire.encode(msg))
    assert got.pair_token.dtype == torch.int32 and got.pair_token.tolist() == [2, 0, 1]
    assert got.pair_expert.dtype == torch.int32 and got.pair_expert.tolist() == [7, 5, 127]
    assert got.pair_weight.dtype == torch.float32 and got.pair_weight.tolist() == [0.5, 0.25, 0.125]


def test_encode_rejects_unsupported_hidden_dtype() -> None:
    with pytest.raises(WireError, match="hidden dtype torch.float64"):
        wire.encode(wire.Result(req=1, layer=0, y=torch.zeros(2, 2, dtype=torch.float64)))


def good_frames() -> list:
    return list(wire.encode(dispatch(torch.float32, rows=4, hidden=8, pairs=6)))


FIELDS = ["v", "kind", "req", "layer", "dtype", "rows", "hidden", "pairs"]  # a dispatch header, in order


def with_header(frames: list, drop: str | None = None, **changes: object) -> list:
    """The frames with header items changed by name (and one item dropped)."""
    header = msgpack.unpackb(frames[0])
    for key, value in changes.items():
        header[FIELDS.index(key)] = value
    if drop is not None:
        del header[FIELDS.index(drop)]
    return [msgpack.packb(header), *frames[1:]]


def error_frames(**changes: object) -> list:
    header = msgpack.unpackb(wire.encode(wire.ErrorReply(42, 3, "boom"))[0])
    for key, value in changes.items():
        header[["v", "kind", "req", "layer", "reason"].index(key)] = value
    return [msgpack.packb(header)]


# (make the bad frames from good_frames(), what decode's error says)
MALFORMED = [
    (lambda f: [], "no header frame"),
    (lambda f: [b"\xc1\xc1garbage", *f[1:]], "header frame is not msgpack"),
    (lambda f: [msgpack.packb({"v": 2}), *f[1:]], "header must be an array, got dict"),
    (lambda f: [msgpack.packb([]), *f[1:]], "wire version None is not 2"),
    (lambda f: with_header(f, v=99), "wire version 99 is not 2"),
    (lambda f: with_header(f, v=1), "wire version 1 is not 2"),
    (lambda f: with_header(f, v=None), "wire version None"),
    (lambda f: with_header(f, kind="ping"), "unknown message kind 'ping'"),
    (lambda f: with_header(f, req=None), "field 'req' is missing"),
    (lambda f: with_header(f, req=True), "field 'req' is missing or not an int"),
    (lambda f: with_header(f, layer="3"), "field 'layer' is missing or not an int"),
    (lambda f: [msgpack.packb([2, "dispatch", 42])], "field 'layer' is missing"),
    (lambda f: with_header(f, drop="pairs"), "dispatch header has 7 items, expected 8"),
    (lambda f: [msgpack.packb([*msgpack.unpackb(f[0]), 0]), *f[1:]], "dispatch header has 9 items, expected 8"),
    (lambda f: with_header(f, dtype="float64"), "dtype 'float64' is not one of"),
    (lambda f: with_header(f, dtype=None), "dtype None is not one of"),
    (lambda f: with_header(f, dtype=[1]), "dtype \\[1\\] is not one of"),
    (lambda f: with_header(f, rows=-4), "field 'rows' is not a count: -4"),
    (lambda f: with_header(f, hidden=8.0), "field 'hidden' is not a count: 8.0"),
    (lambda f: with_header(f, pairs=None), "field 'pairs' is not a count: None"),
    (lambda f: with_header(f, pairs=-1), "field 'pairs' is not a count: -1"),
    (lambda f: f[:-1], "dispatch message has 2 frame\\(s\\), expected 3"),
    (lambda f: [*f, b"extra"], "dispatch message has 4 frame\\(s\\), expected 3"),
    (lambda f: [f[0], bytes(memoryview(f[1]))[:-4], f[2]], "frame x has 124 bytes, expected 128"),
    (lambda f: with_header(f, hidden=7), "frame x has 128 bytes, expected 112"),
    (lambda f: [*f[:2], b"\x00" * 8], "frame pairs has 8 bytes, expected 72"),
    (lambda f: with_header(f, pairs=5), "frame pairs has 72 bytes, expected 60"),
    (lambda f: [with_header(f, kind="result", drop="pairs", hidden=7)[0], f[1]], "frame y has 128 bytes"),
    (lambda f: with_header(f, kind="result", drop="pairs"), "result message has 3 frame\\(s\\), expected 2"),
    (lambda f: [with_header(f, kind="result", drop="pairs", dtype="int8")[0], f[1]], "dtype 'int8' is not one"),
    (lambda f: with_header(f, kind="result"), "result header has 8 items, expected 7"),
    (lambda f: error_frames() + f[1:], "error message has 3 frame\\(s\\), expected 1"),
    (lambda f: error_frames(reason=None), "error header field 'reason' is not a string"),
    (lambda f: error_frames(req="42"), "error header field 'req' is missing or not an int"),
]


@pytest.mark.parametrize(("make", "message"), MALFORMED)
def test_malformed_messages_raise_wire_error(make, message: str) -> None:
    with pytest.raises(WireError, match=message):
        wire.decode(make(good_frames()))


def test_pair_token_outside_rows_is_rejected() -> None:
    msg = dispatch(torch.float32, rows=4, pairs=3)
    for rows in ([0, 4, 1], [0, -1, 1]):  # past the end, and negative
        bad = wire.Dispatch(
            msg.req, msg.layer, msg.x, wire.pack_pairs(torch.tensor(rows), msg.pair_expert, msg.pair_weight)
        )
        with pytest.raises(WireError, match="pair_token outside the 4 rows") as info:
            wire.decode(wire.encode(bad))
        assert (info.value.req, info.value.layer) == (42, 3)


def test_decode_bounds_expert_ids_when_given_the_expert_count() -> None:
    msg = dispatch(torch.float32, rows=4, pairs=3)
    assert_same_dispatch(wire.decode(wire.encode(msg), num_experts=160), msg)  # ids drawn from 0..159
    for experts, bounds in (([0, 160, 1], "0..160"), ([0, -1, 1], "-1..1")):
        bad = wire.Dispatch(
            msg.req, msg.layer, msg.x, wire.pack_pairs(msg.pair_token, torch.tensor(experts), msg.pair_weight)
        )
        with pytest.raises(WireError, match=f"expert ids {bounds} outside 0..159") as info:
            wire.decode(wire.encode(bad), num_experts=160)
        assert (info.value.req, info.value.layer) == (42, 3)
        assert isinstance(wire.decode(wire.encode(bad)), wire.Dispatch)  # without the count, not checked


def test_dispatch_frames_from_numpy_pairs_match_encode() -> None:
    msg = dispatch(torch.bfloat16, rows=4, pairs=3)
    frames = wire.dispatch_frames(msg.req, msg.layer, msg.x, msg.pairs.numpy())
    assert [bytes(memoryview(f)) for f in frames] == [bytes(memoryview(f)) for f in wire.encode(msg)]
    bad_pairs = (msg.pairs.numpy().astype(np.int64), msg.pairs.numpy().T.copy().T, msg.pairs.numpy()[:2])
    for pairs in bad_pairs:
        with pytest.raises(WireError, match="dispatch pairs must be \\[3, P\\] int32 in C order"):
            wire.dispatch_frames(msg.req, msg.layer, msg.x, pairs)


def test_encode_rejects_pairs_that_are_not_three_int32_rows() -> None:
    msg = dispatch(torch.float32, rows=4, pairs=3)
    for pairs in (msg.pairs.long(), msg.pairs[:2], msg.pairs.reshape(-1)):
        with pytest.raises(WireError, match="dispatch pairs must be \\[3, P\\] int32"):
            wire.encode(wire.Dispatch(msg.req, msg.layer, msg.x, pairs))


def test_wire_error_carries_request_id_once_header_names_it() -> None:
    with pytest.raises(WireError) as info:
        wire.decode(with_header(good_frames(), dtype="int8"))
    assert (info.value.req, info.value.layer) == (42, 3)
