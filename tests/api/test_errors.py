"""Each bad input gets INVALID_ARGUMENT and a message that starts with the offending field's path."""

from __future__ import annotations

import grpc
import pytest

from cluster import moecluster_pb2 as pb

CONTEXT = 2048  # the tiny checkpoint's max_position_embeddings


def sampling(**fields) -> pb.SamplingParams:
    return pb.SamplingParams(**fields)


BAD_REQUESTS = {
    "empty prompt": (pb.GenerateRequest(prompt=""), "prompt"),
    "prompt longer than the context": (pb.GenerateRequest(prompt_token_ids=[7] * (CONTEXT + 5)), "prompt_token_ids"),
    "prompt as long as the context": (pb.GenerateRequest(prompt="a" * CONTEXT), "prompt"),
    "max tokens zero": (pb.GenerateRequest(prompt="hi", sampling=sampling(max_new_tokens=0)),
                        "sampling.max_new_tokens"),
    "max tokens negative": (pb.GenerateRequest(prompt="hi", sampling=sampling(max_new_tokens=-3)),
                            "sampling.max_new_tokens"),
    "max tokens beyond the context": (pb.GenerateRequest(prompt="hi", sampling=sampling(max_new_tokens=CONTEXT + 1)),
                                      "sampling.max_new_tokens"),
    "prompt plus max tokens beyond the context": (
        pb.GenerateRequest(prompt_token_ids=[7] * 2000, sampling=sampling(max_new_tokens=100)),
        "sampling.max_new_tokens"),
    "temperature negative": (pb.GenerateRequest(prompt="hi", sampling=sampling(temperature=-0.1)),
                             "sampling.temperature"),
    "top-p zero": (pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=0.0)), "sampling.top_p"),
    "top-p above one": (pb.GenerateRequest(prompt="hi", sampling=sampling(top_p=1.5)), "sampling.top_p"),
    "top-k negative": (pb.GenerateRequest(prompt="hi", sampling=sampling(top_k=-1)), "sampling.top_k"),
    "unknown model": (pb.GenerateRequest(model="gpt-9", prompt="hi"), "model"),
    "two prompt kinds": (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1, 2]), "prompt"),
    "three prompt kinds": (pb.GenerateRequest(prompt="hi", prompt_token_ids=[1],
                                              messages=[pb.ChatMessage(role="user", content="x")]), "prompt"),
    "too many stop strings": (pb.GenerateRequest(prompt="hi", sampling=sampling(stop=[f"s{i}" for i in range(17)])),
                              "sampling.stop"),
    "token id outside the vocabulary": (pb.GenerateRequest(prompt_token_ids=[1, 100000]), "prompt_token_ids[1]"),
    "chat message without a role": (pb.GenerateRequest(messages=[pb.ChatMessage(content="hi")]), "messages[0].role"),
    "logprobs too many": (pb.GenerateRequest(prompt="hi", sampling=sampling(logprobs=21)), "sampling.logprobs"),
}


def assert_invalid(err: grpc.RpcError, field: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details().startswith(f"{field}: "), err.details()


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_unary(stub, case):
    request, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, timeout=10)
    assert_invalid(info.value, field)


@pytest.mark.parametrize("case", ["empty prompt", "top-p zero", "unknown model"])
def test_bad_input_stream(stub, case):
    request, field = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(request, timeout=10))
    assert_invalid(info.value, field)


@pytest.mark.parametrize(("request_", "marker", "field"), [
    (pb.GenerateRequest(prompt="hello QQ"), b"QQ", "prompt"),
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="ok"),
                                  pb.ChatMessage(role="user", content="QQ")]), b"QQ", "messages[1].content"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(stop=["a", "QQ"])), b"QQ", "sampling.stop[1]"),
], ids=["prompt", "chat content", "stop string"])
def test_bad_utf8(channel, request_, marker, field):
    """A client in another language can put invalid UTF-8 in a string field: send raw bytes."""
    raw = request_.SerializeToString().replace(marker, b"\xc3\x28")
    for method in ("Generate", "GenerateStream"):
        call = channel.unary_unary if method == "Generate" else channel.unary_stream
        rpc = call(f"/moecluster.v1.MoeCluster/{method}", request_serializer=lambda b: b,
                   response_deserializer=pb.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            result = rpc(raw, timeout=10)
            if method == "GenerateStream":
                list(result)
        assert_invalid(info.value, field)
        assert "UTF-8" in info.value.details()


def test_unparseable_request(channel):
    rpc = channel.unary_unary("/moecluster.v1.MoeCluster/Generate", request_serializer=lambda b: b,
                              response_deserializer=pb.GenerateResponse.FromString)
    with pytest.raises(grpc.RpcError) as info:
        rpc(b"\xff\xff\xff", timeout=10)
    assert_invalid(info.value, "request")


def test_unknown_model_info(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelInfo(pb.GetModelInfoRequest(name="nope"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("name: ")
