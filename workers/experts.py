"""Routed experts and the expert-backend seam.

``ExpertShard`` holds the SwiGLU weights of a set of experts for every MoE layer (stacked as
``gate_up`` [E, 2I, H] and ``down`` [E, H, I]) and computes them grouped by expert: in float32
on the CPU one call of a C++ kernel; otherwise one matmul pair per expert hit, or two padded
batched matmuls over all held experts when the experts are small; never a Python loop over
tokens. The same ``compute`` serves the in-process backend
(``LocalExperts``) and an expert worker's server loop.

An ``ExpertBackend`` is what the MoE block calls: ``submit`` starts the routed computation and
returns a ``PendingExperts`` whose ``result()`` gives the weighted sum; the block computes the
shared expert in between, so a remote backend overlaps the network with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import Protocol

import torch
import torch.nn.functional as F

from workers import cpu_kernels
from workers.config import ModelConfig

# What one expert's matmul pair costs in fixed overhead (about 10 torch calls of a few µs each),
# counted as floating-point operations of a CPU core: the padded path is taken when the padding
# rows it computes in vain cost less arithmetic than the per-expert overhead it saves.
PER_EXPERT_OVERHEAD_FLOPS = 1_000_000

EXPERT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class PendingExperts(Protocol):
    def result(self) -> torch.Tensor:
        """The routed output [T, H]: ``sum_k w_k * Expert_{id_k}(x)`` per token."""


class ExpertBackend(Protocol):
    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> PendingExperts:
        """Start the routed experts of MoE layer ``layer`` for x [T, H] with top-k ids/weights [T, K]."""


def topk_to_pairs(topk_ids: torch.Tensor, topk_weights: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten top-k choices into (token row, expert id, weight) pairs, token-major."""
    num_tokens, k = topk_ids.shape
    pair_token = torch.arange(num_tokens, dtype=torch.int32).repeat_interleave(k)
    return pair_token, topk_ids.reshape(-1).to(torch.int32), topk_weights.reshape(-1).float()


def expert_predicate(config: ModelConfig, expert_ids: Iterable[int]) -> Callable[[str], bool]:
    """Selects the checkpoint tensors of ``expert_ids`` in every MoE layer (MTP layer included)."""
    wanted = set(expert_ids)
    moe_layers = set(config.moe_layer_indices)

    def predicate(name: str) -> bool:
        match = EXPERT_TENSOR.match(name)
        return bool(match) and int(match[1]) in moe_layers and int(match[2]) in wanted

    return predicate


class ExpertShard:
    """Stacked weights of some experts, per MoE layer, and their grouped SwiGLU."""

    def __init__(self, expert_ids: list[int], num_experts: int,
                 layers: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.expert_ids = sorted(expert_ids)
        self.layers = layers  # layer -> (gate_up [E_local, 2I, H], down [E_local, H, I])
        # Global expert id -> row of the stacked weights; experts held elsewhere map to one past the
        # last row, so the per-expert counts of `compute` also count the pairs it cannot serve.
        self.local_index = torch.full((num_experts,), len(self.expert_ids), dtype=torch.long)
        self.local_index[self.expert_ids] = torch.arange(len(self.expert_ids))
        self._kernel_fit: dict[int, bool] = {}

    @classmethod
    def from_tensors(cls, config: ModelConfig, expert_ids: Iterable[int],
                     tensors: dict[str, torch.Tensor]) -> ExpertShard:
        """Stack checkpoint-named expert tensors; every layer must hold every expert asked for."""
        ids = sorted(set(expert_ids))
        layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in config.moe_layer_indices:
            prefix = f"model.layers.{layer}.mlp.experts"
            try:
                gate_up = torch.stack([torch.cat((tensors[f"{prefix}.{e}.gate_proj.weight"],
                                                  tensors[f"{prefix}.{e}.up_proj.weight"])) for e in ids])
                down = torch.stack([tensors[f"{prefix}.{e}.down_proj.weight"] for e in ids])
            except KeyError as exc:
                raise KeyError(f"expert tensor {exc.args[0]} was not loaded") from None
            layers[layer] = (gate_up, down)
        return cls(ids, config.n_routed_experts, layers)

    def tensor_names(self) -> list[str]:
        """The checkpoint names this shard holds (for tests and status)."""
        return [f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                for layer in sorted(self.layers) for e in self.expert_ids
                for proj in ("gate_proj", "up_proj", "down_proj")]

    def to(self, device: torch.device | str) -> ExpertShard:
        self.layers = {k: (g.to(device), d.to(device)) for k, (g, d) in self.layers.items()}
        self.local_index = self.local_index.to(device)
        self._kernel_fit.clear()
        return self

    def compute(self, layer: int, x: torch.Tensor, pair_token: torch.Tensor, pair_expert: torch.Tensor,
                pair_weight: torch.Tensor) -> torch.Tensor:
        """``y[t] = sum over pairs p of token t: w_p * Expert_{e_p}(x[t])`` for x [n, H] → [n, H].

        In float32 on the CPU, one call of the C++ kernel (``workers.cpu_kernels.routed_experts``)
        does it all when the kernels are built: 2-4x faster than the torch paths below at every
        expert size measured, since it reads each weight row once per tile of four rows.
        Otherwise (other dtypes, CUDA, no compiler), pairs are sorted by expert once and their rows
        of x gathered once, so each expert runs on a contiguous slice; the weighted outputs are
        scattered back with a single ``index_add_``.
        When padding every held expert to the largest group wastes less arithmetic than the
        per-expert overhead it saves (``PER_EXPERT_OVERHEAD_FLOPS``: small experts, as in the tiny
        checkpoints), the groups run as two batched matmuls over all held experts instead.
        Raises KeyError for a layer not held here, IndexError for an expert id outside the model
        and ValueError for an expert held by another worker.
        """
        if layer not in self.layers:
            raise KeyError(f"MoE layer {layer} is not held here (layers: {sorted(self.layers)})")
        gate_up, down = self.layers[layer]
        if x.dtype == torch.float32 and x.device.type == "cpu" and self._kernel_fits(layer):
            try:
                return cpu_kernels.routed_experts(x.contiguous(), pair_token.contiguous(), pair_expert.contiguous(),
                                                  pair_weight.float().contiguous(), self.local_index, gate_up, down)
            except ValueError:
                pass  # an expert not held here: the checks below name every one
        num_local = len(self.expert_ids)
        local = self.local_index.index_select(0, pair_expert)  # bounds-checked, negative ids included
        counts = torch.bincount(local, minlength=num_local + 1).tolist()
        if counts[num_local]:
            missing = sorted(set(pair_expert[local == num_local].tolist()))
            raise ValueError(f"experts {missing} of layer {layer} are not held here")
        order = torch.argsort(local, stable=True)
        rows = pair_token.index_select(0, order)
        xs = x.index_select(0, rows)  # [P, H], grouped by expert
        max_count = max(counts[:num_local], default=0)
        experts_hit = num_local - counts[:num_local].count(0)
        padding_rows = num_local * max_count - len(rows)
        flops_per_row = 6 * gate_up.shape[2] * down.shape[2]
        if gate_up.dtype == x.dtype and rows.numel() and \
                padding_rows * flops_per_row <= experts_hit * PER_EXPERT_OVERHEAD_FLOPS:
            ys = self._padded(gate_up, down, xs, local.index_select(0, order), counts[:num_local], max_count)
        else:
            ys = self._per_expert(gate_up, down, xs, counts[:num_local])
        # Weigh and sum in float32, as the reference does (its fp32 routing weights promote the product).
        weight = pair_weight.index_select(0, order).float().unsqueeze(1)
        weighted = ys.mul_(weight) if ys.dtype == torch.float32 else ys * weight
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device).index_add_(0, rows, weighted)
        return out.to(x.dtype)

    def _kernel_fits(self, layer: int) -> bool:
        """Whether the C++ kernel can compute this layer's experts: float32 weights on the CPU, their
        widths a multiple of 8, and the kernels built. Worked out once per layer."""
        fits = self._kernel_fit.get(layer)
        if fits is None:
            gate_up, down = self.layers[layer]
            fits = self._kernel_fit[layer] = (
                gate_up.device.type == "cpu" and gate_up.dtype == down.dtype == torch.float32
                and gate_up.shape[2] % 8 == 0 and down.shape[2] % 8 == 0 and cpu_kernels.available())
        return fits

    @staticmethod
    def _per_expert(gate_up: torch.Tensor, down: torch.Tensor, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """SwiGLU of rows grouped by expert: a matmul pair per expert hit, on its contiguous slice."""
        ys = torch.empty_like(xs)
        start = 0
        for e_local, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate, up = F.linear(xs[start:end], gate_up[e_local].to(xs.dtype)).chunk(2, dim=-1)
            torch.mm(F.silu(gate) * up, down[e_local].to(xs.dtype).t(), out=ys[start:end])
            start = end
        return ys

    @staticmethod
    def _padded(gate_up: torch.Tensor, down: torch.Tensor, xs: torch.Tensor, sorted_local: torch.Tensor,
                counts: list[int], max_count: int) -> torch.Tensor:  # counts: rows per held expert
        """The same SwiGLU as two batched matmuls over every held expert, each padded to ``max_count`` rows.

        Row p of expert e goes to slot ``e * max_count + (p - first row of e)``; slots without a
        row stay zero and are never read back. A fixed handful of operations whatever the number
        of experts hit, so it wins when per-operation overhead, not arithmetic, dominates.
        """
        num_local = gate_up.shape[0]
        first_row = torch.tensor([0, *accumulate(counts[:-1])], dtype=torch.long, device=xs.device)
        slot = sorted_local * max_count + torch.arange(xs.shape[0], device=xs.device) - first_row[sorted_local]
        padded = xs.new_zeros(num_local * max_count, xs.shape[1]).index_copy_(0, slot, xs)
        hidden = torch.bmm(padded.view(num_local, max_count, -1), gate_up.transpose(1, 2))  # [E, C, 2I]
        gate, up = hidden.chunk(2, dim=-1)
        out = torch.bmm(F.silu(gate) * up, down.transpose(1, 2))                          # [E, C, H]
        return out.view(num_local * max_count, -1).index_select(0, slot)


class _Done:
    def __init__(self, value: torch.Tensor) -> None:
        self._value = value

    def result(self) -> torch.Tensor:
        return self._value


class LocalExperts:
    """The in-process backend: every expert in this process (reference model and tests)."""

    def __init__(self, shard: ExpertShard) -> None:
        self.shard = shard

    def submit(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor,
               topk_weights: torch.Tensor) -> PendingExperts:
        pair_token, pair_expert, pair_weight = topk_to_pairs(topk_ids, topk_weights)
        return _Done(self.shard.compute(layer, x, pair_token.to(x.device), pair_expert.to(x.device),
                                        pair_weight.to(x.device)))
