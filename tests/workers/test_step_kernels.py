"""Faster ways to compute a step that must not change it: decode rows grouped by context length
(the grouping rule; any grouping leaves each row's logits as one padded group gives them; the
torch path, used where the C++ kernel of workers.cpu_kernels is not built) and
q/k/v and gate/up projections fused into one matmul each."""

from __future__ import annotations

import pytest
import torch

from workers import cpu_kernels
from workers.batch import SequenceChunk, build_batch, group_decode_rows
from workers.generate import load_model
from workers.kv_cache import PagedKVCache


def test_groups_are_sorted_by_length_and_cut_at_the_slot_budget():
    lens = [30, 5, 17, 64, 3, 16]  # block size 8: widths 32, 8, 24, 64, 8, 16
    assert group_decode_rows(lens, 8, None) == [[4, 1, 5, 2, 0, 3]]
    # budget 64 slots: 3 x 16 = 48 fits, a fourth of width 24 (4 x 24 = 96) does not; 2 x 32 = 64 fits
    assert group_decode_rows(lens, 8, 64) == [[4, 1, 5], [2, 0], [3]]
    # a sequence wider than the budget still gets a group of its own
    assert group_decode_rows(lens, 8, 8) == [[4], [1], [5], [2], [0], [3]]
    assert group_decode_rows([], 8, 48) == []


@pytest.mark.parametrize("group_slots", [4, 24, 60])
def test_grouped_decode_gives_the_logits_of_one_group(tiny_checkpoint, group_slots, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # groups are the torch fallback's way
    model = load_model(tiny_checkpoint("glm45"))
    kv = PagedKVCache(model.config, num_blocks=128, block_size_tokens=4)
    gen = torch.Generator().manual_seed(5)
    chunks = []
    for start, new in ((11, 1), (0, 9), (5, 1), (30, 1), (2, 1), (17, 1)):
        table = kv.allocator.allocate(-(-(start + new) // 4))
        ids = torch.randint(0, model.config.vocab_size, (start + new,), generator=gen).tolist()
        if start:  # fill the context first, as an earlier step would have
            model.forward(build_batch([SequenceChunk(ids[:start], 0, table, num_logits=0)], 4), kv)
        chunks.append(SequenceChunk(ids[start:], start, table))
    want = model.forward(build_batch(chunks, 4), kv).logits
    batch = build_batch(chunks, 4, decode_group_slots=group_slots)
    assert len(batch.decode_groups) > 1
    assert sorted(r for g in batch.decode_groups for r in g.rows.tolist()) == [0, 10, 11, 12, 13]
    # other padding lengths may change the last bits of a sum, nothing more
    torch.testing.assert_close(model.forward(batch, kv).logits, want, atol=1e-5, rtol=0)


def test_fused_projections_give_the_logits_of_separate_ones(tiny_checkpoint):
    """load_model fuses q/k/v and gate/up into one matmul each; the separate linears give the same."""
    model = load_model(tiny_checkpoint("glm45"))
    kv = PagedKVCache(model.config, num_blocks=32, block_size_tokens=4)
    chunks = [SequenceChunk(list(range(3, 3 + n)), 0, kv.allocator.allocate(5), num_logits=n) for n in (7, 1, 12)]
    fused = model.forward(build_batch(chunks, 4), kv).logits
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.untyped_storage().data_ptr() == attention.k_proj.weight.untyped_storage().data_ptr()
    for module in model.modules():
        for name in ("qkv_weight", "qkv_bias", "gate_up_weight"):
            if getattr(module, name, None) is not None:
                setattr(module, name, None)
    torch.testing.assert_close(model.forward(build_batch(chunks, 4), kv).logits, fused, atol=1e-5, rtol=0)
