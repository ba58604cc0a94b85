"""The coordinator over the in-process model: batch invariance, preemption, seeds, stops, aborts."""

from __future__ import annotations

import asyncio
import random

import pytest

from cluster.engine import Engine, EngineConfig, EngineOverloaded, InvalidRequest
from cluster.errors import WorkerFailure
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


class _CountingExecutor:
    """Wraps an engine's executor: how many steps were in flight at most (sent, not collected)."""

    def __init__(self, engine: Engine) -> None:
        self.in_flight = self.most = 0
        self._launch, self._collect = engine.executor.launch, engine.executor.collect_async
        engine.executor.launch, engine.executor.collect_async = self.launch, self.collect_async  # type: ignore

    def launch(self, steps):
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        return self._launch(steps)

    async def collect_async(self, launched):
        self.in_flight -= 1
        return await self._collect(launched)


def _mixed_params(i: int, n: int, stop_ids: tuple[int, ...]) -> SamplingParams:
    kinds = [
        SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, stop_token_ids=stop_ids, logprobs=1),
        SamplingParams(max_new_tokens=n, temperature=0.9, seed=i, top_k=20, ignore_eos=True),
        SamplingParams(max_new_tokens=n, temperature=0.8, seed=i, repetition_penalty=1.4, frequency_penalty=0.5,
                       ignore_eos=True, stop_token_ids=stop_ids),
        SamplingParams(max_new_tokens=n, temperature=0.0, stop=("e",)),
    ]
    return kinds[i % len(kinds)]


@pytest.mark.parametrize("num_kv_blocks", [512, 40])
def test_overlapped_scheduling_gives_what_step_by_step_scheduling_gives(tiny_checkpoint, num_kv_blocks):
    """Sending step N+1 before step N's tokens are back changes no token, text, finish reason or
    count: stop tokens and strings, penalties (their history holds placeholders), seeds, and
    preemption while a step is in flight."""
    checkpoint = tiny_checkpoint("air")
    requests = _requests(40, 400, seed=4)
    stop_ids = (17, 101, 250, 333, 402)
    results, logprobs, counters = {}, {}, {}
    for overlapped in (False, True):
        engine = _engine(checkpoint, num_kv_blocks=num_kv_blocks, block_size_tokens=4, max_num_batched_tokens=64,
                         async_scheduling=overlapped)
        counters[overlapped] = _CountingExecutor(engine)

        async def go(engine=engine):
            return await asyncio.gather(*[_collect(engine.submit(p, _mixed_params(i, n, stop_ids)))
                                          for i, (p, n) in enumerate(requests)])
        outs = _run(engine, go)
        results[overlapped] = [(tokens, text, [(o.finish_reason, o.completion_tokens) for o in o_list])
                               for tokens, text, o_list in outs]
        logprobs[overlapped] = [lp for _, _, o_list in outs for o in o_list for lp in o.logprobs or []]
        assert engine.kv_blocks_in_use() == 0
        if num_kv_blocks == 40:
            assert engine.scheduler.num_preemptions > 0
    assert results[True] == results[False]
    # the same tokens from batches of other shapes: logprobs agree to float32 rounding
    assert logprobs[True] == pytest.approx(logprobs[False], abs=1e-5) and logprobs[True]
    assert counters[False].most == 1 and counters[True].most == 2
    finishes = {o[-1][0] for _, _, o in results[True]}
    assert finishes == {"stop", "length"}


def test_a_failed_step_ends_the_requests_of_every_step_in_flight(tiny_checkpoint):
    engine = _engine(tiny_checkpoint("air"), num_kv_blocks=128, block_size_tokens=4)
    collect = engine.executor.collect
    calls = []

    def failing_collect(launched):
        calls.append(1)
        if len(calls) == 3:
            raise WorkerFailure("step failed on attention worker 0: injected")
        return collect(launched)
    engine.executor.collect = failing_collect  # type: ignore[method-assign]

    async def go():
        streams = [engine.submit([1 + i, 2, 3], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))
                   for i in range(4)]
        outs = [(await _collect(s))[2] for s in streams]
        assert all(o[-1].finish_reason == "abort" and "injected" in o[-1].error for o in outs)
        assert engine.kv_blocks_in_use() == 0 and engine.ready
        tokens, _, after = await _collect(engine.submit([4, 5], SamplingParams(max_new_tokens=5, temperature=0)))
        return tokens, after[-1].finish_reason
    tokens, finish = _run(engine, go)
    assert len(tokens) == 5 and finish == "length"
