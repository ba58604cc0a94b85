"""The C++ readers of the dispatch round trip's messages (workers/csrc/wire_codec.cpp) against
router.wire.decode: the same values for every message they read, None for every message decode
rejects (and for the few valid ones they leave to it), and tensors that keep their frames alive."""

from __future__ import annotations

import gc
import random
import sys

import msgpack
import pytest
import torch
import zmq

from router import wire
from tests.router.test_wire import MALFORMED, dispatch, good_frames
from workers import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.disabled_by_env(), reason=f"{cpu_kernels.DISABLE_ENV} turns them off")

NUM_EXPERTS = 160  # tests.router.test_wire.dispatch draws expert ids from 0..159
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Each msgpack width an unsigned int can take (fixint, uint 8/16/32/64), at both ends.
IDS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1]


@pytest.fixture(autouse=True)
def kernels_built():
    assert cpu_kernels.available(), f"C++ CPU kernels did not load: {cpu_kernels.load_error()}"


def read_dispatch(frames: list) -> tuple | None:
    return cpu_kernels.decode_dispatch()(frames, NUM_EXPERTS)


def read_result(frames: list) -> tuple | None:
    return cpu_kernels.dispatch_kernels().decode_result(frames)


def assert_same_tensor(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def assert_reads_as_decode(frames: list, allow_none: bool = False) -> None:
    """The readers give what decode gives for these frames; None only where allowed (or decode rejects)."""
    try:
        want = wire.decode(frames, NUM_EXPERTS)
    except wire.WireError:
        want = None
    got_dispatch, got_result = read_dispatch(frames), read_result(frames)
    if not isinstance(want, wire.Dispatch):
        assert got_dispatch is None
    if not isinstance(want, wire.Result):
        assert got_result is None
    if want is None:
        return
    got = got_dispatch if isinstance(want, wire.Dispatch) else got_result
    if got is None:
        assert allow_none, f"a reader left a well-formed {type(want).__name__} to decode"
        return
    assert got[:2] == (want.req, want.layer)
    if isinstance(want, wire.Dispatch):
        for tensor, name in zip(got[2:], ("x", "pair_token", "pair_expert", "pair_weight"), strict=True):
            assert_same_tensor(tensor, getattr(want, name))
    else:
        assert_same_tensor(got[2], want.y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,pairs", [(1, 1, 1), (5, 8, 7), (64, 96, 512)])
def test_dispatches_and_results_read_as_decode_reads_them(dtype, rows, hidden, pairs) -> None:
    msg = dispatch(dtype, rows=rows, hidden=hidden, pairs=pairs)
    for req, layer in zip(IDS, reversed(IDS), strict=True):
        msg.req, msg.layer = req, layer
        assert_reads_as_decode(wire.encode(msg))
        assert_reads_as_decode(wire.encode(wire.Result(req, layer, msg.x * 2)))


def test_frames_received_over_tcp_read_as_decode_reads_them() -> None:
    ctx = zmq.Context()
    server, client = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        msg = dispatch(torch.bfloat16, rows=300, hidden=64, pairs=900)  # above pyzmq's zero-copy threshold
        client.send_multipart(wire.encode(msg), copy=False)
        identity, *frames = server.recv_multipart(copy=False)
        assert_reads_as_decode(frames)
        server.send_multipart([identity, *wire.encode(wire.Result(1, 2, msg.x))], copy=False)
        assert_reads_as_decode(client.recv_multipart(copy=False))
    finally:
        server.close(linger=0)
        client.close(linger=0)
        ctx.term()


@pytest.mark.parametrize(("make", "message"), MALFORMED)
def test_messages_decode_rejects_are_left_to_it(make, message) -> None:
    frames = make(good_frames())
    with pytest.raises(wire.WireError):
        wire.decode(frames, NUM_EXPERTS)
    assert read_dispatch(frames) is None and read_result(frames) is None


def test_pairs_outside_x_or_the_experts_are_left_to_decode() -> None:
    msg = dispatch(torch.float32, rows=4, pairs=3)
    for tokens, experts in (([0, 4, 1], [1, 2, 3]), ([0, -1, 1], [1, 2, 3]),
                            ([0, 1, 2], [1, NUM_EXPERTS, 3]), ([0, 1, 2], [1, -1, 3])):
        bad = wire.Dispatch(msg.req, msg.layer, msg.x,
                            wire.pack_pairs(torch.tensor(tokens), torch.tensor(experts), msg.pair_weight))
        assert read_dispatch(wire.encode(bad)) is None


def test_valid_messages_a_reader_leaves_to_decode() -> None:
    """Empty tensors, negative or past-int64 ids, other msgpack encodings: decode reads them, the readers need not."""
    msg = dispatch(torch.float32, rows=4, pairs=3)
    cases = [wire.encode(dispatch(torch.float32, rows=0, pairs=0)),
             wire.encode(dispatch(torch.float32, rows=3, pairs=0)),
             wire.encode(wire.Result(1, 2, torch.zeros(0, 8)))]
    for req in (-1, 2**63, 2**64 - 1):
        cases.append(wire.encode(wire.Dispatch(req, 3, msg.x, msg.pairs)))
        cases.append(wire.encode(wire.Result(req, 3, msg.x)))
    frames = wire.encode(msg)
    cases.append([b"\xdc\x00\x08" + frames[0][1:], *frames[1:]])  # array16 instead of fixarray
    cases.append([frames[0][:1] + b"\xd0\x02" + frames[0][2:], *frames[1:]])  # version as int8
    for case in cases:
        assert_reads_as_decode(case, allow_none=True)


def test_mutated_headers_are_read_as_decode_reads_them_or_left_to_it() -> None:
    rng = random.Random(0)
    msg = dispatch(torch.bfloat16, rows=6, hidden=8, pairs=10)
    bases = [wire.encode(msg), wire.encode(wire.Result(7, 1, msg.x))]
    for _ in range(3000):
        frames = list(rng.choice(bases))
        header = bytearray(frames[0])
        for _ in range(rng.randint(1, 3)):
            where = rng.randrange(len(header) + 1)
            change = rng.choice(("flip", "insert", "delete", "truncate"))
            if change == "flip" and where < len(header):
                header[where] ^= 1 << rng.randrange(8)
            elif change == "insert":
                header.insert(where, rng.randrange(256))
            elif change == "delete" and where < len(header):
                del header[where]
            elif change == "truncate":
                del header[where:]
        frames[0] = bytes(header)
        assert_reads_as_decode(frames, allow_none=True)


def test_tensors_keep_their_frames_alive() -> None:
    msg = dispatch(torch.float32, rows=5, hidden=8, pairs=7)
    frames = [bytes(memoryview(f)) for f in wire.encode(msg)]
    x_frame, pairs_frame = frames[1], frames[2]
    refs = sys.getrefcount(x_frame), sys.getrefcount(pairs_frame)
    req, layer, x, pair_token, pair_expert, pair_weight = read_dispatch(frames)
    assert (sys.getrefcount(x_frame), sys.getrefcount(pairs_frame)) == (refs[0] + 1, refs[1] + 1)
    del frames, x_frame, pairs_frame  # only the tensors hold them now
    gc.collect()
    assert torch.equal(x, msg.x) and torch.equal(pair_weight, msg.pair_weight)
    assert torch.equal(pair_token, msg.pair_token) and torch.equal(pair_expert, msg.pair_expert)

    y_frame = bytes(wire.tensor_frame(msg.x))
    before = sys.getrefcount(y_frame)
    _, _, y = read_result([msgpack.packb([wire.WIRE_VERSION, "result", 1, 2, "float32", 5, 8]), y_frame])
    assert sys.getrefcount(y_frame) == before + 1
    del y
    assert sys.getrefcount(y_frame) == before  # released with the tensor
