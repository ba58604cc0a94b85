"""The single-process model and the greedy generation loop.

``load_model`` puts the whole model in this process (experts behind the in-process backend);
``greedy_loop`` drives any step function over flat batches with a paged KV cache, so the
single-process reference (``generate``) and the cluster share the same loop. The single process
is what the cluster is checked against and the baseline of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.batch import SequenceChunk, build_batch
from workers.checkpoint import Checkpoint
from workers.experts import ExpertShard, LocalExperts, expert_predicate
from workers.kv_cache import BlockAllocator, PagedKVCache, blocks_needed
from workers.model import Glm4MoeForCausalLM

StepFn = Callable[[list[SequenceChunk]], torch.Tensor]
"""Runs one flat step and returns the logits [N, V] of the rows asked for (one per chunk here)."""


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> Glm4MoeForCausalLM:
    """The whole model in this process, experts behind the in-process backend."""
    checkpoint = Checkpoint(folder)
    config = checkpoint.config
    model = Glm4MoeForCausalLM.from_tensors(
        config, checkpoint.load(Glm4MoeForCausalLM.owns_tensor(config), dtype), device)
    all_experts = range(config.n_routed_experts)
    shard = ExpertShard.from_tensors(config, all_experts,
                                     checkpoint.load(expert_predicate(config, all_experts), dtype))
    model.set_expert_backend(LocalExperts(shard.to(device)))
    return model


@dataclass
class GenerateResult:
    token_ids: list[list[int]]
    logits: list[list[torch.Tensor]] = field(default_factory=list)  # per prompt, per step [V]


def greedy_loop(step: StepFn, allocator: BlockAllocator, prompts: list[list[int]], max_new_tokens: int,
                block_size_tokens: int, stop_token_ids: tuple[int, ...] = (),
                keep_logits: bool = False) -> GenerateResult:
    """Greedy continuations: one prefill step for every prompt, then one decode step per token."""
    tables = [allocator.allocate(blocks_needed(len(p) + max_new_tokens, block_size_tokens)) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    logits_out: list[list[torch.Tensor]] = [[] for _ in prompts]
    chunks = [SequenceChunk(list(p), 0, t) for p, t in zip(prompts, tables, strict=True)]
    active = list(range(len(prompts)))
    try:
        while active:
            logits = step(chunks)
            next_tokens = logits.argmax(dim=-1).tolist()
            still = []
            for row, seq in enumerate(active):
                outputs[seq].append(next_tokens[row])
                if keep_logits:
                    logits_out[seq].append(logits[row].float().cpu())
                if len(outputs[seq]) < max_new_tokens and next_tokens[row] not in stop_token_ids:
                    still.append(seq)
            active = still
            chunks = [SequenceChunk([outputs[s][-1]], len(prompts[s]) + len(outputs[s]) - 1, tables[s])
                      for s in active]
    finally:
        for table in tables:
            allocator.free(table)
    return GenerateResult(outputs, logits_out)


def generate(model: Glm4MoeForCausalLM, prompts: list[list[int]], max_new_tokens: int,
             stop_token_ids: tuple[int, ...] = (), block_size_tokens: int = 16,
             keep_logits: bool = False) -> GenerateResult:
    """Greedy continuations of ``prompts`` with the single-process model."""
    device = model.lm_head.weight.device
    num_blocks = sum(blocks_needed(len(p) + max_new_tokens, block_size_tokens) for p in prompts)
    kv = PagedKVCache(model.config, num_blocks, block_size_tokens, dtype=model.lm_head.weight.dtype,
                      device=device)

    def step(chunks: list[SequenceChunk]) -> torch.Tensor:
        return model.forward(build_batch(chunks, block_size_tokens, device), kv).logits

    return greedy_loop(step, kv.allocator, prompts, max_new_tokens, block_size_tokens, stop_token_ids,
                       keep_logits)
