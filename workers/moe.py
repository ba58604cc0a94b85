"""The MoE block: sigmoid top-k gate with the correction bias, shared expert, routed experts via
an expert backend (GLM45.md §2, "MoE block").

The routed experts are not parameters of this module: they live behind ``ExpertBackend`` —
in-process for the reference model, remote expert workers in the cluster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers import cpu_kernels
from workers.config import ModelConfig
from workers.experts import ExpertBackend, PendingExperts
from workers.layers import MLP


class MoeGate(nn.Module):
    """``mlp.gate``: fp32 router logits → sigmoid → biased, group-limited top-k → normalised weights."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] → (topk_ids [T, K] int64, topk_weights [T, K] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        if logits.is_cpu and cpu_kernels.available():  # the rest as one C++ call
            return cpu_kernels.moe_route(logits, self.e_score_correction_bias.float(), self.top_k, self.n_group,
                                         self.topk_group, self.norm_topk_prob, self.routed_scaling_factor)
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias.float()  # the bias picks experts, never weighs them
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[:, :, None], float("-inf")).view(x.shape[0], -1)
        topk_ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.routed_scaling_factor


class MoE(nn.Module):
    """``routed(x) + shared_experts(x)``; the shared expert has weight 1 and no scaling factor."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.gate = MoeGate(config)
        self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.experts: ExpertBackend | None = None  # set by the owner: local experts or the dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pending, shared = self.start(x)
        return self.finish(x, pending, shared)

    def start(self, x: torch.Tensor) -> tuple[PendingExperts, torch.Tensor]:
        """Gate, send the routed experts off, compute the shared expert while they run."""
        if self.experts is None:
            raise RuntimeError(f"MoE layer {self.layer_index} has no expert backend")
        topk_ids, topk_weights = self.gate(x)
        pending = self.experts.submit(self.layer_index, x, topk_ids, topk_weights)
        return pending, self.shared_experts(x)  # overlaps with a remote dispatch in flight

    @staticmethod
    def finish(x: torch.Tensor, pending: PendingExperts, shared: torch.Tensor) -> torch.Tensor:
        return pending.result().to(x.dtype) + shared
