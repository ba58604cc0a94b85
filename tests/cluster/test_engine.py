"""The coordinator over the in-process model: batch invariance, preemption, seeds, stops, aborts."""

from __future__ import annotations

import asyncio
import random

import pytest

from cluster.engine import Engine, EngineConfig, EngineOverloaded, InvalidRequest
from workers.sampling import SamplingParams


def _requests(count: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 60))], rng.randint(1, 24)) for _ in range(count)]


async def _collect(stream):
    tokens, text, outputs = [], "", []
    async for out in stream:
        tokens += out.new_token_ids
        text += out.text_delta
        outputs.append(out)
    return tokens, text, outputs


def _engine(checkpoint, **kwargs) -> Engine:
    return Engine.create_local(EngineConfig(str(checkpoint), **kwargs))


def _run(engine: Engine, coro):
    async def main():
        await engine.start()
        try:
            return await coro()
        finally:
            await engine.stop()
    return asyncio.run(main())


def _alone(checkpoint, requests, params_of) -> list[list[int]]:
    engine = _engine(checkpoint, num_kv_blocks=256, block_size_tokens=4)

    async def go():
        return [(await _collect(engine.submit(p, params_of(i, n))))[0] for i, (p, n) in enumerate(requests)]
    return _run(engine, go)


def _greedy(i: int, n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("num_kv_blocks", [512, 40])
def test_64_concurrent_greedy_requests_equal_each_alone(tiny_checkpoint, num_kv_blocks):
    checkpoint = tiny_checkpoint("glm45")
    requests = _requests(64, 400)
    expected = _alone(checkpoint, requests, _greedy)
    engine = _engine(checkpoint, num_kv_blocks=num_kv_blocks, block_size_tokens=4, max_num_batched_tokens=96)

    async def go():
        return await asyncio.gather(*[_collect(engine.submit(p, _greedy(i, n))) for i, (p, n) in enumerate(requests)])
    results = _run(engine, go)
    assert [r[0] for r in results] == expected
    if num_kv_blocks == 40:
        assert engine.scheduler.num_preemptions > 0
    assert engine.kv_blocks_in_use() == 0


def test_seeded_sampling_is_reproducible_in_any_batch_and_after_preemption(tiny_checkpoint):
    checkpoint = tiny_checkpoint("air")
    requests = _requests(24, 400, seed=1)

    def seeded(i: int, n: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=n + 8, temperature=0.9, top_p=0.9, top_k=50, seed=1000 + i,
                              ignore_eos=True)
    expected = _alone(checkpoint, requests, seeded)
    engine = _engine(checkpoint, num_kv_blocks=30, block_size_tokens=4, max_num_batched_tokens=64)

    async def go():
        return await asyncio.gather(*[_collect(engine.submit(p, seeded(i, n))) for i, (p, n) in enumerate(requests)])
    assert [r[0] for r in _run(engine, go)] == expected
    assert engine.scheduler.num_preemptions > 0
    different = _alone(checkpoint, requests[:1], lambda i, n: seeded(i + 1, n))
    assert different[0] != expected[0]


def test_stop_string_spanning_tokens_stops_there_and_is_not_returned(tiny_checkpoint):
    checkpoint = tiny_checkpoint("air")
    engine = _engine(checkpoint, num_kv_blocks=64, block_size_tokens=4)
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode("The capital of France")

    async def go():
        _, text, outs = await _collect(engine.submit(prompt, SamplingParams(max_new_tokens=40, temperature=0,
                                                                          ignore_eos=True)))
        deltas = [o.text_delta for o in outs]
        # A stop string made of the last char of one token's text and the first char of the next one's.
        offset = 0
        for a, b in zip(deltas, deltas[1:], strict=False):
            offset += len(a)
            if a and b and "\ufffd" not in a + b and text.find(a[-1] + b[0]) == offset - 1:
                stop = a[-1] + b[0]
                break
        else:
            pytest.fail(f"no clean token boundary in {text!r}")
        _, stopped_text, outputs = await _collect(engine.submit(prompt, SamplingParams(
            max_new_tokens=40, temperature=0, ignore_eos=True, stop=(stop,))))
        return text, stop, stopped_text, outputs
    text, stop, stopped_text, outputs = _run(engine, go)
    assert stopped_text == text[: text.find(stop)]
    assert outputs[-1].finish_reason == "stop"


def test_aborting_half_of_32_running_requests_frees_their_blocks(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("air"), num_kv_blocks=512, block_size_tokens=4)
    requests = _requests(32, 400, seed=2)

    async def go():
        streams = [engine.submit(p, SamplingParams(max_new_tokens=200, temperature=0, ignore_eos=True),
                                 request_id=f"r{i}") for i, (p, _) in enumerate(requests)]
        firsts = [await anext(s) for s in streams]          # every request is running now
        assert all(f.finish_reason is None for f in firsts)
        for i in range(0, 32, 2):
            engine.abort(f"r{i}")
        await asyncio.sleep(0.05)
        kept = [r for r in engine.scheduler.running]
        assert sorted(r.request_id for r in kept) == sorted(f"r{i}" for i in range(1, 32, 2))
        assert engine.kv_blocks_in_use() == sum(len(r.block_table) for r in kept)
        for i in range(0, 32, 2):
            _, _, outs = await _collect(streams[i])
            assert outs[-1].finish_reason == "abort"
        for i in range(1, 32, 2):
            engine.abort(f"r{i}")
        await asyncio.sleep(0.05)
        return engine.kv_blocks_in_use(), [a.num_free for a in engine.scheduler.allocators]
    in_use, free = _run(engine, go)
    assert in_use == 0 and free == [512]


def test_finish_reasons_stop_tokens_and_logprobs(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("air"), num_kv_blocks=64, block_size_tokens=4)

    async def go():
        tokens, _, outs = await _collect(engine.submit([5, 6, 7], SamplingParams(
            max_new_tokens=10, temperature=0, ignore_eos=True, logprobs=3)))
        assert outs[-1].finish_reason == "length" and len(tokens) == 10
        assert all(o.logprobs and len(o.top_logprobs[0]) == 3 for o in outs)
        assert outs[-1].completion_tokens == 10 and outs[-1].prompt_tokens == 3
        stop_at = tokens[4]
        cut, _, outs = await _collect(engine.submit([5, 6, 7], SamplingParams(
            max_new_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=(stop_at,))))
        assert cut == tokens[: tokens.index(stop_at) + 1] and outs[-1].finish_reason == "stop"
    _run(engine, go)


def test_bad_requests_and_overload(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("air"), num_kv_blocks=16, block_size_tokens=4, max_waiting_requests=2)

    async def go():
        with pytest.raises(InvalidRequest, match="prompt"):
            engine.submit([], SamplingParams())
        with pytest.raises(InvalidRequest, match="max_new_tokens"):
            engine.submit([1, 2], SamplingParams(max_new_tokens=100))   # more KV than a worker has
        with pytest.raises(InvalidRequest, match="temperature"):
            engine.submit([1, 2], _bad_temperature())
        streams = [engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4)) for _ in range(2)]
        with pytest.raises(EngineOverloaded):
            engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
        for s in streams:
            await _collect(s)
        assert engine.kv_blocks_in_use() == 0
    _run(engine, go)


def _bad_temperature() -> SamplingParams:
    params = SamplingParams()
    object.__setattr__(params, "temperature", -1.0)  # bypass __post_init__: the engine validates again
    return params
