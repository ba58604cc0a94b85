"""ModelRunner: one engine step on an attention worker — forward the flat batch, then sample.

Sampling runs where the logits are, so only token ids (and optional logprobs) leave the worker.
A seeded request's draw is a pure function of (seed, how many tokens it already produced, its
logits row): the generator is rebuilt from those each step, so the request replays identically
whatever else is in the batch, after a preemption, and on any attention worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.batch import SequenceChunk, build_batch
from workers.kv_cache import PagedKVCache
from workers.model import Glm4MoeForCausalLM
from workers.sampling import Sampler, SamplingParams

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads consecutive draw indices of one seed far apart


@dataclass(frozen=True)
class RowSampling:
    """How to pick the next token of one sequence in a step."""

    params: SamplingParams
    draw_index: int                          # tokens the request produced before this one
    prompt_ids: tuple[int, ...] = ()         # only sent when the request uses penalties
    output_ids: tuple[int, ...] = ()


@dataclass
class StepOutput:
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def draw_generator(seed: int | None, draw_index: int) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * _SEED_STRIDE + draw_index) % (2**63))


class ModelRunner:
    def __init__(self, model: Glm4MoeForCausalLM, kv: PagedKVCache) -> None:
        self.model = model
        self.kv = kv
        self.sampler = Sampler()

    def logits(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        batch = build_batch(chunks, self.kv.block_size_tokens, self.kv.k.device)
        return self.model.forward(batch, self.kv).logits

    def execute(self, chunks: list[SequenceChunk], sampling: list[RowSampling]) -> StepOutput:
        """Forward ``chunks``; sample one token for each chunk that asks for logits (in order)."""
        wanted = sum(c.num_logits for c in chunks)
        if wanted != len(sampling):
            raise ValueError(f"{wanted} logits rows but {len(sampling)} sampling rows")
        logits = self.logits(chunks).float()
        if not sampling:
            return StepOutput([], [], [])
        result = self.sampler.sample(
            logits, [s.params for s in sampling], [list(s.prompt_ids) for s in sampling],
            [list(s.output_ids) for s in sampling],
            [draw_generator(s.params.seed, s.draw_index) for s in sampling])
        return StepOutput(result.token_ids, result.logprobs, result.top_logprobs)
