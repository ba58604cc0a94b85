"""Micro-batched steps: a step cut into micro-batches that take turns per layer gives each row
exactly what the unsplit forward gives it, and the cut keeps order and balances tokens."""

from __future__ import annotations

import pytest
import torch

from workers.batch import SequenceChunk, build_batch
from workers.generate import load_model
from workers.kv_cache import PagedKVCache
from workers.model_runner import ModelRunner, RowSampling, split_chunks
from workers.sampling import SamplingParams


def _sizes(groups):
    return [[len(c.token_ids) for c in g] for g in groups]


def test_split_keeps_order_balances_tokens_and_leaves_no_group_empty():
    def chunk(n):
        return SequenceChunk([1] * n, 0, [0] * 64)

    assert _sizes(split_chunks([chunk(1)] * 5, 2)) == [[1, 1, 1], [1, 1]]
    assert _sizes(split_chunks([chunk(100)] + [chunk(1)] * 5, 2)) == [[100], [1, 1, 1, 1, 1]]
    assert _sizes(split_chunks([chunk(1)] * 2, 2)) == [[1], [1]]
    assert _sizes(split_chunks([chunk(1)] * 7, 3)) == [[1, 1, 1], [1, 1], [1, 1]]
    assert _sizes(split_chunks([chunk(3)], 4)) == [[3]]
    chunks = [chunk(n) for n in (5, 40, 1, 1, 7, 30, 1)]
    groups = split_chunks(chunks, 3)
    assert [c for g in groups for c in g] == chunks and len(groups) == 3 and all(groups)


def _step(model, lengths, start):
    kv = PagedKVCache(model.config, num_blocks=128, block_size_tokens=4)
    gen = torch.Generator().manual_seed(3)
    chunks = []
    for n, s in zip(lengths, start, strict=True):
        table = kv.allocator.allocate(-(-(s + n) // 4))
        ids = torch.randint(0, model.config.vocab_size, (s + n,), generator=gen).tolist()
        if s:  # fill the context first, as an earlier step would have
            model.forward(build_batch([SequenceChunk(ids[:s], 0, table, num_logits=0)], 4), kv)
        chunks.append(SequenceChunk(ids[s:], s, table, num_logits=1))
    return kv, chunks


@pytest.mark.parametrize("parts", [2, 3])
def test_overlapped_forward_equals_the_unsplit_forward(tiny_checkpoint, parts):
    model = load_model(tiny_checkpoint("glm45"))
    lengths, starts = (1, 9, 1, 1, 23, 1), (11, 0, 5, 30, 0, 2)
    kv, chunks = _step(model, lengths, starts)
    want = model.forward(build_batch(chunks, 4), kv).logits
    groups = split_chunks(chunks, parts)
    outs = model.forward_overlapped([build_batch(g, 4) for g in groups], kv)
    assert len(outs) == parts
    torch.testing.assert_close(torch.cat([o.logits for o in outs]), want, atol=1e-5, rtol=0)
    runner = ModelRunner(model, kv, micro_batches=parts)
    greedy = [RowSampling(SamplingParams(temperature=0.0), 0)] * len(chunks)
    assert runner.execute(chunks, greedy).token_ids == want.argmax(-1).tolist()


def test_micro_batches_must_be_positive(tiny_checkpoint):
    model = load_model(tiny_checkpoint("air"))
    with pytest.raises(ValueError, match="micro_batches"):
        ModelRunner(model, PagedKVCache(model.config, 8, 4), micro_batches=0)
