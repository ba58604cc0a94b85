"""ModelRunner: one engine step on an attention worker — forward the flat batch, then sample.

Sampling runs where the logits are, so only token ids (and optional logprobs) leave the worker.
The runner keeps the token ids its last step sampled: a step sent before the coordinator had them
(overlapped scheduling) names such a token by a placeholder ``-(row + 1)`` in its token ids,
which ``resolve_placeholders`` replaces before the forward.
A seeded request's draw is a pure function of (seed, how many tokens it already produced, its
logits row): the generator is rebuilt from those each step, so the request replays identically
whatever else is in the batch, after a preemption, and on any attention worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers import cpu_kernels
from workers.batch import SequenceChunk, build_batch
from workers.kv_cache import PagedKVCache
from workers.model import Glm4MoeForCausalLM
from workers.sampling import Sampler, SamplingParams

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads consecutive draw indices of one seed far apart

# Without the C++ kernel, decode attention on the CPU gathers each group's keys (and values) into
# one padded tensor; past about a core's cache size the gather and the matmuls reading it slow
# down by half, so groups of similar context lengths are cut to gather at most this many bytes of
# keys each.
CPU_DECODE_GROUP_BYTES = 1 << 20


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


def _resolved(ids: list[int] | tuple[int, ...], previous: list[int] | None) -> list[int]:
    out = list(ids)
    for i, token in enumerate(ids):
        if token < 0:
            row = -token - 1
            if previous is None or row >= len(previous):
                have = "no sampled tokens (it failed or none ran)" if previous is None else \
                    f"{len(previous)} sampled token(s)"
                raise ValueError(f"token id {token} refers to row {row} of the previous step's samples, "
                                 f"but that step left {have}")
            out[i] = previous[row]
    return out


def resolve_placeholders(chunks: list[SequenceChunk], sampling: list[RowSampling],
                         previous: list[int] | None) -> tuple[list[SequenceChunk], list[RowSampling]]:
    """Replace each placeholder ``-(row + 1)`` in the chunks' token ids (and in the output ids sent
    for penalties) by ``previous[row]``, the token that row of the previous step sampled.

    Raises ValueError for a placeholder with no such token (the previous step failed or was shorter).
    """
    for i, chunk in enumerate(chunks):
        if chunk.token_ids and min(chunk.token_ids) < 0:
            chunks[i] = SequenceChunk(_resolved(chunk.token_ids, previous), chunk.start_position,
                                      chunk.block_table, chunk.num_logits)
    for i, row in enumerate(sampling):
        if row.output_ids and min(row.output_ids) < 0:
            sampling[i] = RowSampling(row.params, row.draw_index, row.prompt_ids,
                                      tuple(_resolved(row.output_ids, previous)))
    return chunks, sampling


def split_chunks(chunks: list[SequenceChunk], parts: int) -> list[list[SequenceChunk]]:
    """Cut a step's chunks, in order, into at most ``parts`` runs of about equal token counts."""
    total = sum(len(c.token_ids) for c in chunks)
    groups: list[list[SequenceChunk]] = [[]]
    done = 0
    for i, chunk in enumerate(chunks):
        unopened = parts - len(groups)
        share_done = done >= total * len(groups) / parts
        if groups[-1] and unopened and (share_done or len(chunks) - i <= unopened):
            groups.append([])
        groups[-1].append(chunk)
        done += len(chunk.token_ids)
    return groups


class ModelRunner:
    """Runs steps on one attention worker.

    ``micro_batches`` > 1 cuts each step into that many micro-batches that take turns per layer
    (``Glm4MoeForCausalLM.forward_overlapped``): worth it when the routed experts are remote.
    """

    def __init__(self, model: Glm4MoeForCausalLM, kv: PagedKVCache, micro_batches: int = 1) -> None:
        if micro_batches < 1:
            raise ValueError(f"micro_batches={micro_batches} must be >= 1")
        self.model = model
        self.kv = kv
        self.micro_batches = micro_batches
        self.sampler = Sampler()
        self.last_sampled: list[int] | None = None  # token ids of the last step, for placeholders
        # One group: the GPU path and the CPU kernel attend in one call.
        self.decode_group_slots: int | None = None
        if kv.k.device.type == "cpu" and not cpu_kernels.available():
            slot_bytes = kv.k.shape[1] * kv.k.shape[3] * kv.k.element_size()
            self.decode_group_slots = max(kv.block_size_tokens, CPU_DECODE_GROUP_BYTES // slot_bytes)

    def logits(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        device = self.kv.k.device
        if self.micro_batches > 1 and len(chunks) > 1:
            batches = [build_batch(group, self.kv.block_size_tokens, device, self.decode_group_slots)
                       for group in split_chunks(chunks, self.micro_batches)]
            return torch.cat([out.logits for out in self.model.forward_overlapped(batches, self.kv)])
        batch = build_batch(chunks, self.kv.block_size_tokens, device, self.decode_group_slots)
        return self.model.forward(batch, self.kv).logits

    def execute(self, chunks: list[SequenceChunk], sampling: list[RowSampling]) -> StepOutput:
        """Forward ``chunks``; sample one token for each chunk that asks for logits (in order)."""
        previous, self.last_sampled = self.last_sampled, None  # a failed step leaves no tokens to refer to
        wanted = sum(c.num_logits for c in chunks)
        if wanted != len(sampling):
            raise ValueError(f"{wanted} logits rows but {len(sampling)} sampling rows")
        chunks, sampling = resolve_placeholders(list(chunks), list(sampling), previous)
        logits = self.logits(chunks).float()
        if not sampling:
            self.last_sampled = []
            return StepOutput([], [], [])
        result = self.sampler.sample(
            logits, [s.params for s in sampling], [list(s.prompt_ids) for s in sampling],
            [list(s.output_ids) for s in sampling],
            [draw_generator(s.params.seed, s.draw_index) for s in sampling])
        self.last_sampled = result.token_ids
        return StepOutput(result.token_ids, result.logprobs, result.top_logprobs)
