"""The C++ CPU kernels (workers/csrc) against their torch references: paged decode attention
against attention over the gathered context (and the model with and without it), the routed
experts, RMSNorm, the MoE gate, RoPE, and the dispatcher's plan and combine against its numpy and
torch paths."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from router.dispatcher import Dispatcher
from router.placement import PlacementTable
from workers import cpu_kernels
from workers.batch import SequenceChunk, build_batch
from workers.generate import load_model
from workers.kv_cache import PagedKVCache

pytestmark = pytest.mark.skipif(cpu_kernels.disabled_by_env(), reason=f"{cpu_kernels.DISABLE_ENV} turns them off")


@pytest.fixture(autouse=True)
def kernels_built():
    # `make install` builds them; a machine with a C++ compiler must have them, so this fails, not skips
    assert cpu_kernels.available(), f"C++ CPU kernels did not load: {cpu_kernels.load_error()}"


def paged_case(num_kv: int, num_q: int, dim: int, lens: list[int], block_size: int, dtype: torch.dtype,
               seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    k = torch.randn(num_kv, num_blocks * block_size, dim, generator=gen).to(dtype)
    v = torch.randn(num_kv, num_blocks * block_size, dim, generator=gen).to(dtype)
    order = random.Random(seed).sample(range(num_blocks), num_blocks)  # scattered blocks
    widest = max(-(-n // block_size) for n in lens)
    tables, used = [], 0
    for n in lens:
        count = -(-n // block_size)
        tables.append(order[used:used + count] + [0] * (widest - count))
        used += count
    return k, v, torch.tensor(tables, dtype=torch.long)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor, lens: list[int],
              block_size: int, scale: float) -> torch.Tensor:
    out = []
    for row, n in enumerate(lens):
        slots = (tables[row][:, None] * block_size + torch.arange(block_size)).reshape(-1)[:n]
        out.append(F.scaled_dot_product_attention(q[row].float()[:, None], k[:, slots].float(), v[:, slots].float(),
                                                  scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("num_kv,num_q,dim", [(2, 4, 32), (1, 1, 8), (2, 12, 64)])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_attention_over_the_gathered_context(num_kv, num_q, dim, cache_dtype):
    block_size = 4
    lens = [1, 4, 5, 13, 37, 8]  # a lone token, whole blocks, partial last blocks
    k, v, tables = paged_case(num_kv, num_q, dim, lens, block_size, cache_dtype)
    q = torch.randn(len(lens), num_q, dim, generator=torch.Generator().manual_seed(1))
    out = torch.full_like(q, float("nan"))
    scale = dim ** -0.5
    cpu_kernels.paged_decode_attention(out, q, k, v, torch.arange(len(lens)), tables, torch.tensor(lens),
                                       block_size, scale)
    torch.testing.assert_close(out, reference(q, k, v, tables, lens, block_size, scale), atol=2e-6, rtol=1e-5)


def test_kernel_writes_only_its_rows_and_reads_strided_queries():
    k, v, tables = paged_case(2, 4, 32, [9, 3], 4, torch.float32)
    qkv = torch.randn(5, 4 + 2 + 2, 32)  # rows of a fused q/k/v projection: q is a strided view
    q = qkv[:, :4]
    out = torch.zeros(5, 4, 32, dtype=torch.float32)
    rows = torch.tensor([3, 1])
    cpu_kernels.paged_decode_attention(out, q, k, v, rows, tables, torch.tensor([9, 3]), 4, 0.25)
    want = reference(q[rows], k, v, tables, [9, 3], 4, 0.25)
    torch.testing.assert_close(out[rows], want, atol=2e-6, rtol=1e-5)
    assert out[[0, 2, 4]].abs().sum() == 0


def test_bfloat16_queries_give_bfloat16_outputs():
    k, v, tables = paged_case(2, 4, 32, [7, 20], 4, torch.bfloat16)
    q = torch.randn(2, 4, 32).to(torch.bfloat16)
    out = torch.empty_like(q)
    cpu_kernels.paged_decode_attention(out, q, k, v, torch.arange(2), tables, torch.tensor([7, 20]), 4, 0.2)
    torch.testing.assert_close(out.float(), reference(q, k, v, tables, [7, 20], 4, 0.2), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("change,message", [
    ({"lens": [9, 100]}, "context length 100"),
    ({"lens": [0, 3]}, "context length 0"),
    ({"block": 1_000}, "block 1000 outside the cache"),
    ({"rows": [0, 7]}, "row 7 outside q"),
])
def test_kernel_rejects_reads_outside_the_cache(change, message):
    k, v, tables = paged_case(2, 4, 32, [9, 3], 4, torch.float32)
    if "block" in change:
        tables[1, 0] = change["block"]
    q = torch.randn(2, 4, 32)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match=message):
        cpu_kernels.paged_decode_attention(out, q, k, v, torch.tensor(change.get("rows", [0, 1])), tables,
                                           torch.tensor(change.get("lens", [9, 3])), 4, 0.2)


def test_model_logits_are_the_same_with_and_without_the_kernel(tiny_checkpoint, monkeypatch):
    model = load_model(tiny_checkpoint("glm45"))
    kv = PagedKVCache(model.config, num_blocks=64, block_size_tokens=4)
    gen = torch.Generator().manual_seed(3)
    chunks = []
    for start, new in ((11, 1), (0, 6), (5, 1), (30, 1), (2, 3)):  # decode rows mixed with prefill chunks
        table = kv.allocator.allocate(-(-(start + new) // 4))
        ids = torch.randint(0, model.config.vocab_size, (start + new,), generator=gen).tolist()
        if start:
            model.forward(build_batch([SequenceChunk(ids[:start], 0, table, num_logits=0)], 4), kv)
        chunks.append(SequenceChunk(ids[start:], start, table, num_logits=new))
    with_kernel = model.forward(build_batch(chunks, 4), kv).logits
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.testing.assert_close(model.forward(build_batch(chunks, 4), kv).logits, with_kernel, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tokens,experts,error,message", [
    ([0, 3], [0, 1], IndexError, "pair 1: token 3 out of range"),
    ([0, -1], [0, 1], IndexError, "pair 1: token -1 out of range"),
    ([0, 1], [0, 4], IndexError, "pair 1: expert id 4 out of range"),
    ([0, 1], [0, 2], ValueError, "pair 1: expert 2 is not held here"),
])
def test_routed_experts_kernel_rejects_pairs_it_cannot_serve(tokens, experts, error, message):
    gate_up, down = torch.randn(2, 16, 8), torch.randn(2, 8, 8)
    local_index = torch.tensor([0, 1, 2, 2])  # experts 0 and 1 held, 2 and 3 not
    with pytest.raises(error, match=message):
        cpu_kernels.routed_experts(torch.randn(3, 8), torch.tensor(tokens, dtype=torch.int32),
                                   torch.tensor(experts, dtype=torch.int32), torch.ones(2), local_index, gate_up, down)


def test_expert_widths_off_the_kernels_vector_width_take_the_torch_path():
    from workers.experts import ExpertShard

    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(2, 12, 10, generator=gen), torch.randn(2, 10, 6, generator=gen)  # H 10, I 6
    shard = ExpertShard([0, 1], 2, {1: (gate_up, down)})
    assert not shard._kernel_fits(1)
    x = torch.randn(3, 10, generator=gen)
    got = shard.compute(1, x, torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([1, 0, 1], dtype=torch.int32),
                        torch.tensor([0.5, 1.0, 2.0]))
    gate, up = F.linear(x[2], gate_up[0]).chunk(2)
    torch.testing.assert_close(got[2], F.linear(F.silu(gate) * up, down[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(5, 64), (3, 4, 32), (1, 8)])
def test_rms_norm_kernels_match_torch(shape):
    gen = torch.Generator().manual_seed(2)
    x, residual = torch.randn(shape, generator=gen) * 3, torch.randn(shape, generator=gen)
    weight = torch.rand(shape[-1], generator=gen) + 0.5
    torch.testing.assert_close(cpu_kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, weight.shape, weight, 1e-5))
    total, normed = cpu_kernels.add_rms_norm(x, residual, weight, 1e-6)
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(x + residual, weight.shape, weight, 1e-6))


def test_rms_norm_kernel_rejects_what_it_cannot_compute():
    with pytest.raises(RuntimeError, match="multiple of 8"):
        cpu_kernels.rms_norm(torch.randn(2, 10), torch.ones(10), 1e-5)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.rms_norm(torch.randn(2, 8).double(), torch.ones(8), 1e-5)
    with pytest.raises(RuntimeError, match="shaped like x"):
        cpu_kernels.add_rms_norm(torch.randn(2, 8), torch.randn(3, 8), torch.ones(8), 1e-5)


@pytest.mark.parametrize("preset", ["air", "glm45", "grouped"])
@pytest.mark.parametrize("norm", [True, False])
def test_moe_route_kernel_matches_the_torch_gate(preset, norm, monkeypatch):
    from workers.moe import MoeGate
    from workers.tiny import tiny_config

    config = tiny_config(preset).replace(norm_topk_prob=norm)
    gate = MoeGate(config)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=gen))
        gate.e_score_correction_bias.copy_(torch.randn(config.n_routed_experts, generator=gen) * 0.1)
    x = torch.randn(37, config.hidden_size, generator=gen)
    ids, weights = gate(x)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    want_ids, want_weights = gate(x)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)


def test_moe_route_kernel_rejects_bad_group_settings():
    with pytest.raises(RuntimeError, match="n_group must divide"):
        cpu_kernels.moe_route(torch.randn(2, 16), torch.zeros(16), 4, 3, 1, True, 1.0)
    with pytest.raises(RuntimeError, match="top_k exceeds"):
        cpu_kernels.moe_route(torch.randn(2, 16), torch.zeros(16), 9, 4, 2, True, 1.0)


@pytest.mark.parametrize("rotary_dim", [16, 32])
def test_rope_kernel_matches_the_torch_rotation(rotary_dim, monkeypatch):
    from workers.layers import RotaryEmbedding
    from workers.tiny import tiny_config

    rope = RotaryEmbedding(tiny_config("air").replace(partial_rotary_factor=rotary_dim / 32))
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(9, 4 + 2 + 2, 32, generator=gen)
    qk = qkv[:, :6]  # a strided view, as the attention passes it
    cos, sin = rope.cos_sin(torch.arange(100, 109), torch.float32)
    got = RotaryEmbedding.apply(qk, cos, sin)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    torch.testing.assert_close(got, RotaryEmbedding.apply(qk, cos, sin))


def float32_combine(num_tokens, replies, rows):
    """The reference: index_add in float32, rounded once."""
    acc = torch.zeros(num_tokens, replies[0].shape[1])
    for y, r in zip(replies, rows, strict=True):
        acc.index_add_(0, torch.arange(num_tokens) if r is None else r, y.float())
    return acc.to(replies[0].dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_combine_replies_is_the_float32_sum_rounded_once(dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, width = 9, 48
    # whole-batch and partial replies; token 3 is in no reply, tokens 2 and 8 in three or four
    rows = [None, torch.tensor([0, 2, 5, 8]), torch.tensor([7, 2, 1]), None]
    replies = [torch.randn(tokens if r is None else len(r), width, generator=gen).mul(100).to(dtype) for r in rows]
    got = cpu_kernels.combine_replies(tokens, replies, rows)
    assert got.dtype == dtype and torch.equal(got, float32_combine(tokens, replies, rows))
    partial = cpu_kernels.combine_replies(tokens, replies[1:3], rows[1:3])
    assert torch.equal(partial, float32_combine(tokens, replies[1:3], rows[1:3]))
    assert not partial[3].any() and not partial[4].any()  # tokens no reply holds are zero
    assert torch.equal(cpu_kernels.combine_replies(tokens, replies[:1], [None]), replies[0])


def test_combine_replies_rounds_to_nearest_even_and_keeps_specials():
    one = torch.ones(1, 16, dtype=torch.bfloat16)
    # 1 + 2^-8 is halfway between two bfloat16 values: nearest even is 1; 1 + 3 * 2^-8 rounds up
    tie = torch.full((1, 16), 2.0**-8, dtype=torch.bfloat16)
    assert torch.equal(cpu_kernels.combine_replies(1, [one, tie], [None, None]), one)
    up = torch.full((1, 16), 3 * 2.0**-8, dtype=torch.bfloat16)
    assert cpu_kernels.combine_replies(1, [one, up], [None, None])[0, 0].item() == 1 + 2.0**-6
    special = torch.tensor([[float("inf"), float("-inf"), float("nan")] + [0.0] * 13], dtype=torch.bfloat16)
    got = cpu_kernels.combine_replies(1, [special, one], [None, None])[0, :3].float()
    assert got[0] == float("inf") and got[1] == float("-inf") and got[2].isnan()
    inf_minus_inf = cpu_kernels.combine_replies(1, [special[:, :1].repeat(1, 16), -special[:, :1].repeat(1, 16)],
                                                [None, None])
    assert inf_minus_inf.float().isnan().all()


@pytest.mark.parametrize("replies,rows,error,message", [
    ([torch.zeros(2, 16)], [torch.tensor([0, 0])], RuntimeError, "names token 0 twice"),
    ([torch.zeros(2, 16)], [torch.tensor([0, 3])], IndexError, "token 3 outside 0..2"),
    ([torch.zeros(2, 16)], [torch.tensor([0, -1])], IndexError, "token -1 outside"),
    ([torch.zeros(2, 16)], [None], RuntimeError, "covers every token but has 2 rows, not 3"),
    ([torch.zeros(3, 16, dtype=torch.float16)], [None], RuntimeError, "bfloat16 or float32"),
    ([torch.zeros(3, 8, dtype=torch.bfloat16)], [None], RuntimeError, "multiple of 16"),
    ([torch.zeros(3, 16), torch.zeros(3, 24)], [None, None], RuntimeError, "reply 1"),
    ([torch.zeros(2, 16)], [torch.tensor([0, 1], dtype=torch.int32)], RuntimeError, "int64"),
])
def test_combine_replies_rejects_what_it_cannot_sum(replies, rows, error, message):
    with pytest.raises(error, match=message):
        cpu_kernels.combine_replies(3, replies, rows)


def test_combine_declines_what_the_kernel_does_not_sum():
    assert cpu_kernels.combine(2, [torch.zeros(2, 16, dtype=torch.float16)], [None]) is None
    assert cpu_kernels.combine(2, [torch.zeros(2, 40, dtype=torch.bfloat16)], [None]) is None  # 40 % 16
    ones = torch.ones(2, 8)
    assert torch.equal(cpu_kernels.combine(2, [ones, ones], [None, None]), 2 * ones)


def planned_messages(placement, x, topk_ids, topk_weights, kernels, req=1, layer=1):
    """What Dispatcher.submit sends, per worker: (rows or None, the frames' bytes, tokens), without sockets."""
    sent = {}
    dispatcher = Dispatcher(placement, {w: f"tcp://127.0.0.1:{9 + w}" for w in range(placement.num_workers)},
                            kernels=kernels)
    dispatcher._req_ids = iter([req])
    try:
        def capture(pending, worker, rows, frames, tokens):
            assert worker not in sent
            sent[worker] = (rows, [bytes(memoryview(f)) for f in frames], tokens)

        dispatcher._send = capture
        dispatcher.submit(layer, x, topk_ids, topk_weights)
    finally:
        dispatcher.close()
    return sent


@pytest.mark.parametrize("workers,replicas,tokens,top_k,dtype,req,layer", [
    (1, 1, 64, 8, torch.bfloat16, 1, 1), (2, 1, 64, 8, torch.bfloat16, 200, 45),
    (4, 1, 64, 8, torch.float32, 70000, 3), (4, 1, 5, 2, torch.float16, 2**32 + 5, 0),
    (8, 1, 37, 4, torch.bfloat16, 2**63 - 1, 300), (3, 2, 50, 8, torch.bfloat16, 0, -1),
    (4, 4, 9, 3, torch.float32, 5, -200), (2, 1, 1, 8, torch.bfloat16, 5, -40000),
    (4, 1, 256, 8, torch.bfloat16, 5, -2**40),
])
def test_dispatch_messages_are_what_the_numpy_path_sends(workers, replicas, tokens, top_k, dtype, req, layer):
    """The C++ builder's frames, byte for byte (the header as msgpack.packb writes every int width)."""
    gen = torch.Generator().manual_seed(workers * 100 + tokens)
    placement = PlacementTable.even(32, workers, replicas=replicas)
    x = torch.randn(tokens, 16, generator=gen).to(dtype)
    topk_ids = torch.rand(tokens, 32, generator=gen).topk(top_k, dim=1).indices
    topk_weights = torch.rand(tokens, top_k, generator=gen)
    want = planned_messages(placement, x, topk_ids, topk_weights, None, req, layer)
    got = planned_messages(placement, x, topk_ids, topk_weights, cpu_kernels.dispatch_kernels(), req, layer)
    assert sorted(got) == sorted(want)
    for worker, (rows, frames, tokens_sent) in want.items():
        got_rows, got_frames, got_tokens = got[worker]
        assert (got_rows is None) == (rows is None)
        if rows is not None:
            assert torch.equal(got_rows, rows)
        assert got_frames == frames and got_tokens == tokens_sent


def test_plan_dispatch_rejects_what_it_cannot_place():
    placement = PlacementTable.even(8, 2)
    table, counts = placement.replica_table()
    x = torch.zeros(2, 16)
    weights = torch.ones(2, 2)
    for bad in (8, -1):
        with pytest.raises(IndexError, match="topk_ids outside 0..7"):
            cpu_kernels.plan_dispatch(x, torch.tensor([[0, 1], [2, bad]]), weights, table, counts, 2, 0.8)
    with pytest.raises(RuntimeError, match="outside 0..0"):  # the table names worker 1 of a 1-worker cluster
        cpu_kernels.plan_dispatch(x, torch.tensor([[0, 7], [1, 2]]), weights, table, counts, 1, 0.8)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.plan_dispatch(x, torch.tensor([[0, 1], [1, 2]]), weights.double(), table, counts, 2, 0.8)


def test_the_bound_functions_and_the_torch_ops_are_the_same_kernels():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 16, generator=gen)
    weight = torch.randn(16, generator=gen)
    assert torch.equal(cpu_kernels.rms_norm(x, weight, 1e-6), torch.ops.moecluster.rms_norm(x, weight, 1e-6))
    replies, rows = [x, x[:2]], [None, torch.tensor([2, 0])]
    assert torch.equal(cpu_kernels.combine_replies(3, replies, rows),
                       torch.ops.moecluster.combine_replies(3, replies, rows))
    table, counts = PlacementTable.even(8, 2).replica_table()
    ids, weights = torch.tensor([[0, 7], [1, 2], [3, 4]]), torch.rand(3, 2, generator=gen)
    bound = cpu_kernels.plan_dispatch(x, ids, weights, table, counts, 2, 0.8)
    op = torch.ops.moecluster.plan_dispatch(x, ids, weights, table, counts, 2, 0.8)
    assert torch.equal(bound[0], op[0])
    for got, want in zip(bound[1:], op[1:], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_build_fingerprint_follows_sources_flags_and_cpu(monkeypatch):
    before = cpu_kernels._fingerprint()
    assert cpu_kernels._fingerprint() == before
    monkeypatch.setattr(cpu_kernels, "CXX_FLAGS", (*cpu_kernels.CXX_FLAGS, "-DCHANGED"))
    assert cpu_kernels._fingerprint() != before
    monkeypatch.undo()
    monkeypatch.setattr(cpu_kernels, "_cpu_features", lambda: "another cpu")
    assert cpu_kernels._fingerprint() != before


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    monkeypatch.setattr(cpu_kernels, "_state", {})
    assert not cpu_kernels.available()
    assert "turned off" in cpu_kernels.load_error()
