"""The step channel's codec and the attention worker's StepServer (a real ROUTER socket)."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from workers.batch import SequenceChunk
from workers.model_runner import RowSampling, StepOutput
from workers.sampling import SamplingParams
from workers.step_server import StepServer
from workers.step_wire import (
    SamplingParamsCache,
    StepWireError,
    decode_reply,
    decode_step,
    encode_error,
    encode_output,
    encode_step,
)

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=5)
SEEDED = SamplingParams(temperature=0.7, top_k=5, seed=3, stop=("ab",), stop_token_ids=(9,), logprobs=2,
                        repetition_penalty=1.2)


def _step():
    chunks = [SequenceChunk([1, 2, 3], 0, [4, 5], 1), SequenceChunk([7], 16, [0, 9], 1),
              SequenceChunk([8, 8], 3, [2], 0)]
    sampling = [RowSampling(GREEDY, 0), RowSampling(SEEDED, 4, (1, 2), (5, 6, 7))]
    return chunks, sampling


def test_a_step_round_trips_and_each_distinct_params_is_built_once():
    chunks, sampling = _step()
    cache = SamplingParamsCache()
    step_id, got_chunks, got_sampling = decode_step(encode_step(7, chunks, sampling), cache)
    assert step_id == 7 and got_chunks == chunks and got_sampling == sampling
    _, _, again = decode_step(encode_step(8, chunks, sampling), cache)
    assert again[1].params is got_sampling[1].params  # the cached object, not validated again


def test_outputs_and_errors_round_trip():
    out = StepOutput([3, 4], [None, -0.5], [None, [(4, -0.5), (1, -2.0)]])
    assert decode_reply(encode_output(2, out)) == (2, out)
    error = encode_error(5, RuntimeError("expert worker 1 gone"))
    assert decode_reply(error) == (5, "RuntimeError: expert worker 1 gone")


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb([1, [[1]], [], []]),
                                  msgpack.packb([1, [], [[0.5]], [[0, 0, [], []]]])])
def test_malformed_steps_raise_a_wire_error(data):
    with pytest.raises(StepWireError):
        decode_step(data, SamplingParamsCache())


def test_invalid_sampling_values_are_rejected_not_used():
    values = tuple(getattr(GREEDY, f) for f in ("max_new_tokens",))  # too few values
    with pytest.raises(StepWireError, match="sampling parameters carry"):
        SamplingParamsCache().get(values)


@pytest.fixture
def client():
    ctx = zmq.Context()
    sockets = []

    def connect(endpoint: str) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    yield connect
    for sock in sockets:
        sock.close()
    ctx.term()


def test_server_runs_steps_answers_errors_and_keeps_serving(client):
    seen = []

    def run(chunks, sampling):
        if chunks[0].token_ids == [0]:
            raise RuntimeError("no expert worker answered")
        seen.append((chunks, sampling))
        return StepOutput([len(chunks)], [None], [None])

    server = StepServer(run).start()
    try:
        sock = client(server.endpoint)
        chunks, sampling = _step()
        sock.send(encode_step(1, chunks, sampling))
        assert decode_reply(sock.recv()) == (1, StepOutput([3], [None], [None]))
        sock.send(b"not msgpack")
        assert decode_reply(sock.recv())[1].startswith("StepWireError: malformed step message")
        sock.send_multipart([b"two", b"frames"])
        assert decode_reply(sock.recv())[1].startswith("StepWireError")
        sock.send(encode_step(2, [SequenceChunk([0], 0, [0])], [RowSampling(GREEDY, 0)]))
        assert decode_reply(sock.recv()) == (2, "RuntimeError: no expert worker answered")
        sock.send(encode_step(3, chunks, sampling))
        assert decode_reply(sock.recv())[0] == 3 and len(seen) == 2
    finally:
        server.stop()
        server.stop()  # idempotent
