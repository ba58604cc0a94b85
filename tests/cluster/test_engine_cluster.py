"""The coordinator over the Ray cluster: same tokens as the single process; failures end requests."""

from __future__ import annotations

import asyncio
import os
import random
import signal

import pytest
import ray

from cluster.engine import Engine, EngineConfig, EngineUnavailable
from workers.sampling import SamplingParams

pytestmark = pytest.mark.slow


def _requests(count: int) -> list[tuple[list[int], int]]:
    rng = random.Random(7)
    return [([rng.randrange(400) for _ in range(rng.randint(1, 40))], rng.randint(1, 20)) for _ in range(count)]


async def _tokens(engine: Engine, requests) -> list[tuple[list[int], str | None]]:
    async def one(prompt, n):
        tokens, finish, error = [], None, None
        async for out in engine.submit(prompt, SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)):
            tokens += out.new_token_ids
            finish, error = out.finish_reason, out.error
        return tokens, finish, error
    return await asyncio.gather(*[one(p, n) for p, n in requests])


def _serve(engine: Engine, body):
    async def main():
        await engine.start()
        try:
            return await body()
        finally:
            await engine.stop()
    return asyncio.run(main())


def test_cluster_engine_matches_local_engine_and_reports_status(local_ray, tiny_checkpoint):
    checkpoint = str(tiny_checkpoint("glm45"))
    requests = _requests(24)
    local = Engine.create_local(EngineConfig(checkpoint, num_kv_blocks=256, block_size_tokens=4))
    want = _serve(local, lambda: _tokens(local, requests))
    engine = Engine.create(EngineConfig(checkpoint, num_attention_workers=2, num_expert_workers=2,
                                        num_kv_blocks=128, block_size_tokens=4, max_num_batched_tokens=64))

    async def body():
        got = await _tokens(engine, requests)
        return got, engine.status()
    got, status = _serve(engine, body)
    assert [g[0] for g in got] == [w[0] for w in want]
    roles = sorted(w["role"] for w in status["workers"])
    assert roles == ["attention", "attention", "expert", "expert"]
    assert all(k["free_blocks"] == k["num_blocks"] for k in status["kv"])
    # load: running requests of an attention worker (none left), token rows/s an expert worker served
    assert [w["load"] for w in status["workers"] if w["role"] == "attention"] == [0, 0]
    assert all(w["load"] > 0 for w in status["workers"] if w["role"] == "expert")


def test_a_dead_expert_worker_ends_requests_with_an_error_not_a_hang(local_ray, tiny_checkpoint):
    engine = Engine.create(EngineConfig(str(tiny_checkpoint("air")), num_expert_workers=2, dispatch_timeout_s=2.0,
                                        num_kv_blocks=256, block_size_tokens=4))
    cluster = engine.executor.cluster

    async def body():
        requests = [(p, 400) for p, _ in _requests(8)]
        task = asyncio.ensure_future(_tokens(engine, requests))
        await asyncio.sleep(0.5)
        ray.kill(cluster.experts[0], no_restart=True)
        results = await asyncio.wait_for(task, timeout=30)
        with pytest.raises(EngineUnavailable, match="expert worker 0"):
            engine.submit([1, 2, 3], SamplingParams())
        return results, engine.kv_blocks_in_use(), engine.ready
    results, in_use, ready = _serve(engine, body)
    assert all(finish == "abort" and error and "worker 0" in error for _, finish, error in results)
    assert in_use == 0 and not ready


def test_a_stopped_attention_worker_ends_requests_with_an_error_not_a_hang(local_ray, tiny_checkpoint):
    """SIGSTOP freezes the worker with its connections open: only the step timeout can notice."""
    engine = Engine.create(EngineConfig(str(tiny_checkpoint("air")), dispatch_timeout_s=1.0, step_timeout_s=2.0,
                                        num_kv_blocks=256, block_size_tokens=4))
    pid = ray.get(engine.executor.cluster.attention[0].ready.remote())["pid"]

    async def body():
        task = asyncio.ensure_future(_tokens(engine, [(p, 400) for p, _ in _requests(4)]))
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        try:
            results = await asyncio.wait_for(task, timeout=60)
        finally:
            os.kill(pid, signal.SIGCONT)
        return results, engine.kv_blocks_in_use()
    results, in_use = _serve(engine, body)
    assert all(finish == "abort" and "attention worker 0" in error and "did not answer step" in error
               for _, finish, error in results)
    assert in_use == 0
