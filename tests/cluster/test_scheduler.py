"""Scheduler policy: decode first, token budget and chunked prefill, preempt newest, spread by free blocks."""

from __future__ import annotations

import asyncio

import pytest

from cluster.request import Request, RequestStatus
from cluster.scheduler import Scheduler, SchedulerConfig
from cluster.stop_checker import StopChecker
from workers.sampling import SamplingParams


def _request(i: int, prompt_len: int, output_len: int = 0) -> Request:
    return Request(request_id=f"r{i}", prompt_ids=list(range(prompt_len)), params=SamplingParams(),
                   arrival=i, detokenizer=None, stop_checker=StopChecker((), False),  # type: ignore[arg-type]
                   stop_token_ids=frozenset(), max_total_tokens=4096, output_ids=[7] * output_len,
                   stream=asyncio.Queue())


def _complete(plans) -> None:
    """What the engine does after a step: cached tokens advance, sampled rows get a token."""
    for plan in plans.values():
        for entry in plan.scheduled:
            entry.request.num_cached += entry.num_tokens
            if entry.samples:
                entry.request.output_ids.append(1)


def test_long_prompt_is_prefilled_in_chunks_within_the_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), 1, num_kv_blocks=64, block_size_tokens=4)
    req = _request(0, 40)
    sched.add(req)
    sizes = []
    while not req.output_ids:
        plans = sched.schedule()
        sizes.append(plans[0].num_tokens)
        assert [c.num_logits for c in plans[0].chunks] == [int(req.num_cached + plans[0].num_tokens == 40)]
        _complete(plans)
    assert sizes == [16, 16, 8]


def test_decodes_go_first_then_prefill_fills_the_budget():
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=10, max_num_seqs=8), 1, 64, 4)
    a = _request(0, 3)
    sched.add(a)
    _complete(sched.schedule())
    b, c = _request(1, 20), _request(2, 5)
    sched.add(b)
    sched.add(c)
    plan = sched.schedule()[0]
    assert [e.request for e in plan.scheduled] == [a, b]
    assert [e.num_tokens for e in plan.scheduled] == [1, 9]
    assert c.status is RequestStatus.WAITING


def test_out_of_blocks_preempts_the_newest_and_recomputes_it():
    sched = Scheduler(SchedulerConfig(), 1, num_kv_blocks=4, block_size_tokens=4)
    old, new = _request(0, 7), _request(1, 7)
    sched.add(old)
    sched.add(new)
    _complete(sched.schedule())          # both prefilled: 2 blocks each, cache full
    old.output_ids.append(2)             # old needs slot 9 → a third block
    plan = sched.schedule()[0]
    assert new.status is RequestStatus.WAITING and new.num_cached == 0 and not new.block_table
    assert sched.waiting[0] is new and sched.num_preemptions == 1
    assert [e.request for e in plan.scheduled] == [old]


def test_new_requests_go_to_the_worker_with_most_free_blocks():
    sched = Scheduler(SchedulerConfig(), 2, num_kv_blocks=16, block_size_tokens=4)
    first = _request(0, 20)
    sched.add(first)
    sched.schedule()
    second, third = _request(1, 4), _request(2, 4)
    sched.add(second)
    sched.add(third)
    sched.schedule()
    assert first.worker != second.worker
    assert third.worker == second.worker  # still more free blocks there than beside the long prompt


def test_finish_returns_every_block():
    sched = Scheduler(SchedulerConfig(), 1, num_kv_blocks=8, block_size_tokens=4)
    reqs = [_request(i, 5) for i in range(3)]
    for r in reqs:
        sched.add(r)
    sched.schedule()
    for r in reqs:
        sched.finish(r)
    assert sched.allocators[0].num_free == 8 and not sched.running


@pytest.mark.parametrize("field", ["max_num_batched_tokens", "max_num_seqs", "max_waiting_requests"])
def test_config_fields_are_validated(field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{field: 0})
