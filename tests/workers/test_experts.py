import pytest
import torch
import torch.nn.functional as F

from workers import cpu_kernels, experts
from workers.experts import ExpertShard, topk_to_pairs

NUM_EXPERTS, HIDDEN, INTERMEDIATE, LAYER = 8, 16, 8, 1


def make_shard(held: list[int], dtype: torch.dtype = torch.float32) -> tuple[ExpertShard, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    gate_up = torch.randn(NUM_EXPERTS, 2 * INTERMEDIATE, HIDDEN, generator=gen) / HIDDEN**0.5
    down = torch.randn(NUM_EXPERTS, HIDDEN, INTERMEDIATE, generator=gen) / INTERMEDIATE**0.5
    layers = {LAYER: (gate_up[held].to(dtype), down[held].to(dtype))}
    return ExpertShard(held, NUM_EXPERTS, layers), gate_up, down


def reference(gate_up, down, x, pair_token, pair_expert, pair_weight) -> torch.Tensor:
    """One pair at a time, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t, e, w in zip(pair_token.tolist(), pair_expert.tolist(), pair_weight.tolist(), strict=True):
        gate, up = F.linear(x[t].float(), gate_up[e]).chunk(2)
        out[t] += w * F.linear(F.silu(gate) * up, down[e])
    return out


def routing(num_tokens: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    ids = torch.rand(num_tokens, NUM_EXPERTS, generator=gen).argsort(dim=1)[:, :k]
    return x, *topk_to_pairs(ids, torch.rand(num_tokens, k, generator=gen))


PATHS = ["kernel", "per-expert", "padded"]


def take_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ExpertShard.compute take one of its three ways of computing."""
    if path == "kernel":
        assert cpu_kernels.available(), f"C++ CPU kernels did not load: {cpu_kernels.load_error()}"
        return
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    # 0: always a matmul pair per expert; 10**12: always the padded batched matmuls
    monkeypatch.setattr(experts, "PER_EXPERT_OVERHEAD_FLOPS", 0 if path == "per-expert" else 10**12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("num_tokens", [0, 1, 5, 40])
def test_compute_matches_pair_by_pair_reference(num_tokens: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    take_path(path, monkeypatch)
    shard, gate_up, down = make_shard(list(range(NUM_EXPERTS)))
    x, pair_token, pair_expert, pair_weight = routing(num_tokens, 3, seed=num_tokens)
    got = shard.compute(LAYER, x, pair_token, pair_expert, pair_weight)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, reference(gate_up, down, x, pair_token, pair_expert, pair_weight),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_compute_takes_pairs_in_any_order_and_a_subset_of_experts(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    take_path(path, monkeypatch)
    held = [1, 4, 6]
    shard, gate_up, down = make_shard(held)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, HIDDEN, generator=gen)
    pair_token = torch.tensor([5, 0, 3, 0, 2, 5, 1], dtype=torch.int32)
    pair_expert = torch.tensor([6, 4, 1, 1, 6, 4, 6], dtype=torch.int32)
    pair_weight = torch.rand(7, generator=gen)
    got = shard.compute(LAYER, x, pair_token, pair_expert, pair_weight)
    want = reference(gate_up, down, x, pair_token, pair_expert, pair_weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[4], torch.zeros(HIDDEN))  # a row without pairs stays zero


def test_compute_half_precision_returns_input_dtype() -> None:
    shard, gate_up, down = make_shard(list(range(NUM_EXPERTS)), torch.bfloat16)
    x, pair_token, pair_expert, pair_weight = routing(20, 4, seed=2)
    x = x.to(torch.bfloat16)
    got = shard.compute(LAYER, x, pair_token, pair_expert, pair_weight)
    assert got.dtype == torch.bfloat16
    want = reference(gate_up.bfloat16().float(), down.bfloat16().float(), x, pair_token, pair_expert, pair_weight)
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("layer", "experts", "error", "message"),
    [
        (LAYER, [0, 5], ValueError, r"experts \[5\] of layer 1 are not held here"),
        (LAYER, [0, NUM_EXPERTS], IndexError, "out of range"),
        (LAYER, [-1, 0], IndexError, "out of range"),
        (2, [0, 1], KeyError, "MoE layer 2 is not held here"),
    ],
)
@pytest.mark.parametrize("path", PATHS)
def test_compute_rejects_what_it_cannot_serve(layer: int, experts: list[int], error: type, message: str, path: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    take_path(path, monkeypatch)
    shard, _, _ = make_shard([0, 1, 2])
    with pytest.raises(error, match=message):
        shard.compute(layer, torch.zeros(2, HIDDEN), torch.tensor([0, 1], dtype=torch.int32),
                      torch.tensor(experts, dtype=torch.int32), torch.ones(2))
