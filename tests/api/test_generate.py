"""Generation over gRPC equals the coordinator's own output: unary, streamed, chat, logprobs, load."""

from __future__ import annotations

import asyncio

import grpc

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc
from workers.sampling import SamplingParams

GREEDY = pb.SamplingParams(max_new_tokens=24, temperature=0.0)


def test_unary_equals_coordinator(api, stub):
    prompt_ids = api.engine.tokenizer.encode("The capital of France is")
    ref_ids, ref_text, _ = api.reference(prompt_ids, SamplingParams(max_new_tokens=24, temperature=0.0))
    reply = stub.Generate(pb.GenerateRequest(prompt="The capital of France is", sampling=GREEDY), timeout=30)
    assert list(reply.token_ids) == ref_ids
    assert reply.text == ref_text
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == len(ref_ids)
    assert reply.usage.total_tokens == len(prompt_ids) + len(ref_ids)
    assert reply.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH)
    assert reply.request_id


def test_stream_equals_coordinator_with_seeded_sampling(api, stub):
    params = SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt_ids = [5, 17, 99, 230, 7]
    ref_ids, ref_text, ref_outs = api.reference(prompt_ids, params)
    sampling = pb.SamplingParams(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    replies = list(stub.GenerateStream(pb.GenerateRequest(prompt_token_ids=prompt_ids, sampling=sampling),
                                       timeout=30))
    assert [t for r in replies for t in r.token_ids] == ref_ids
    assert "".join(r.text for r in replies) == ref_text
    assert len(replies) == len(ref_outs)
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in replies[:-1])
    assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert replies[-1].usage.completion_tokens == 30
    assert len({r.request_id for r in replies}) == 1


def test_chat_messages_rendered_by_template(api, stub):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi."}]
    tokenizer = api.engine.tokenizer
    for enable_thinking in (None, False):
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=enable_thinking))
        ref_ids, ref_text, _ = api.reference(prompt_ids, SamplingParams(max_new_tokens=24, temperature=0.0))
        request = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in messages], sampling=GREEDY)
        if enable_thinking is not None:
            request.enable_thinking = enable_thinking
        reply = stub.Generate(request, timeout=30)
        assert reply.usage.prompt_tokens == len(prompt_ids)
        assert list(reply.token_ids) == ref_ids
        assert reply.text == ref_text


def test_logprobs(api, stub):
    prompt_ids = [11, 12, 13, 14]
    ref_ids, _, ref_outs = api.reference(prompt_ids, SamplingParams(max_new_tokens=8, temperature=0.0, logprobs=3))
    reply = stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt_ids, sampling=pb.SamplingParams(
        max_new_tokens=8, temperature=0.0, logprobs=3)), timeout=30)
    ref_lps = [lp for o in ref_outs if o.logprobs for lp in o.logprobs]
    assert [lp.token_id for lp in reply.logprobs] == ref_ids
    assert [lp.logprob for lp in reply.logprobs] == [float(pb.TokenLogprob(logprob=x).logprob) for x in ref_lps]
    for lp in reply.logprobs:
        assert len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].logprob >= lp.top_logprobs[-1].logprob
        assert lp.logprob <= 0


def test_stop_string(api, stub):
    """A stop string ends generation with reason STOP and is cut from the text."""
    prompt_ids = [40, 41, 42]
    _, free_text, _ = api.reference(prompt_ids, SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True))
    stop = free_text[10:13] if len(free_text) > 13 else free_text[-2:]
    reply = stub.Generate(pb.GenerateRequest(prompt_token_ids=prompt_ids, sampling=pb.SamplingParams(
        max_new_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])), timeout=30)
    assert reply.finish_reason == pb.FINISH_REASON_STOP
    assert reply.text == free_text[:free_text.index(stop)]


def test_32_concurrent_streams_complete(api):
    async def one(stub: pb_grpc.MoeClusterStub, i: int) -> tuple[int, list[int], int]:
        request = pb.GenerateRequest(prompt_token_ids=[3 + i, 50 + i, 7], sampling=pb.SamplingParams(
            max_new_tokens=16, temperature=0.0, ignore_eos=True))
        tokens, finish = [], None
        async for reply in stub.GenerateStream(request, timeout=120):
            tokens.extend(reply.token_ids)
            finish = reply.finish_reason
        return i, tokens, finish

    async def run() -> list:
        async with grpc.aio.insecure_channel(api.target) as channel:
            stub = pb_grpc.MoeClusterStub(channel)
            return await asyncio.gather(*(one(stub, i) for i in range(32)))

    results = asyncio.run(run())
    assert len(results) == 32
    for i, tokens, finish in results:
        assert finish == pb.FINISH_REASON_LENGTH
        ref_ids, _, _ = api.reference([3 + i, 50 + i, 7], SamplingParams(max_new_tokens=16, temperature=0.0,
                                                                         ignore_eos=True))
        assert tokens == ref_ids
    assert api.kv_blocks_in_use() == 0
