"""ForwardBatch: one flat step over many sequences (prefill chunks and decode tokens mixed).

The coordinator describes a step as a list of ``SequenceChunk`` (the new tokens of each
sequence, where they start, and the sequence's KV block table). ``build_batch`` turns that into
the flat tensors the model reads: token ids, positions, the KV slot of every new token, which
rows need logits, and the gather indices/masks attention uses — computed once per step, shared
by every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SequenceChunk:
    """The new tokens of one sequence in a step.

    ``start_position`` is the number of tokens of the sequence already in the KV cache, so the
    chunk occupies positions ``start_position .. start_position + len(token_ids) - 1``.
    ``num_logits`` trailing tokens of the chunk get logits (0 for a middle prefill chunk, 1 to
    sample the next token, more to verify speculative tokens).
    """

    token_ids: list[int]
    start_position: int
    block_table: list[int]
    num_logits: int = 1

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)


@dataclass(frozen=True)
class DecodeGroup:
    """Decode rows whose attention runs as one padded computation."""

    rows: torch.Tensor     # [B] rows of single-token sequences
    blocks: torch.Tensor   # [B, Nmax] their block tables (padded with block 0)
    lens: torch.Tensor     # [B] int64 context length of each row
    block_size_tokens: int

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """[B, Nmax * block_size] True where a slot holds context: made on first use, since the C++
        paged kernel reads only ``lens``."""
        width = self.blocks.shape[1] * self.block_size_tokens
        return torch.arange(width, device=self.lens.device)[None, :] < self.lens[:, None]


def group_decode_rows(context_lens: list[int], block_size_tokens: int, max_slots: int | None) -> list[list[int]]:
    """Indices of decode sequences, shortest context first, cut into groups of at most ``max_slots``
    padded slots each (sequences x the group's longest context, whole blocks); a group always takes
    at least one sequence. ``None``: one group. Sorting by length keeps the padding small."""
    order = sorted(range(len(context_lens)), key=context_lens.__getitem__)
    if max_slots is None:
        return [order] if order else []
    groups: list[list[int]] = []
    for i in order:
        width = -(-context_lens[i] // block_size_tokens) * block_size_tokens
        if groups and (len(groups[-1]) + 1) * width <= max_slots:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor            # [T] int64
    positions: torch.Tensor            # [T] int64
    slot_mapping: torch.Tensor         # [T] int64, KV slot of each new token
    query_lens: list[int]
    context_lens: list[int]            # KV length of each sequence after this step
    logits_indices: torch.Tensor       # [N] rows of the flat batch that get logits
    decode_groups: list[DecodeGroup]   # the single-token sequences, grouped by context length
    block_size_tokens: int
    # per multi-token chunk: (first row, rows, its blocks [n], causal mask [rows, n * block_size])
    prefill_segments: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def build_batch(chunks: list[SequenceChunk], block_size_tokens: int,
                device: torch.device | str = "cpu", decode_group_slots: int | None = None) -> ForwardBatch:
    """Flatten ``chunks`` into one ForwardBatch (sequences keep their order).

    Attention reads whole blocks (one contiguous copy per block), so decode rows carry their
    padded block tables (and, made on first use, a mask over the slots those blocks span). Decode
    rows are grouped by context length (``group_decode_rows``, at most ``decode_group_slots``
    padded slots a group). Integer lists become tensors through numpy: ``torch.tensor`` on a
    Python list costs several times more per element.
    """
    if not chunks:
        raise ValueError("build_batch needs at least one sequence chunk")
    bs = block_size_tokens
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_rows: list[int] = []
    decode_rows: list[int] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    segments: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    row = 0
    for chunk in chunks:
        ids = chunk.token_ids
        n = len(ids)
        start = chunk.start_position
        end = start + n
        table = chunk.block_table
        needed_blocks = -(-end // bs)
        if len(table) < needed_blocks:
            raise ValueError(f"block table has {len(table)} blocks, {needed_blocks} needed for {end} tokens")
        if not 0 <= chunk.num_logits <= n:
            raise ValueError(f"num_logits={chunk.num_logits} outside [0, {n}]")
        if n == 1:  # a decode token: no ranges to build
            token_ids.append(ids[0])
            positions.append(start)
            slots.append(table[start // bs] * bs + start % bs)
            if chunk.num_logits:
                logits_rows.append(row)
            decode_rows.append(row)
            decode_tables.append(table if len(table) == needed_blocks else table[:needed_blocks])
            decode_lens.append(end)
            row += 1
            continue
        if n == 0:
            raise ValueError("a sequence chunk has no tokens")
        token_ids.extend(ids)
        span = range(start, end)
        positions.extend(span)
        slots.extend(table[p // bs] * bs + p % bs for p in span)
        logits_rows.extend(range(row + n - chunk.num_logits, row + n))
        context = torch.arange(needed_blocks * bs)
        mask = context[None, :] <= torch.arange(start, end)[:, None]
        segments.append((row, n, _long_tensor(table[:needed_blocks]).to(device), mask.to(device)))
        row += n

    decode_groups = []
    for group in group_decode_rows(decode_lens, bs, decode_group_slots):
        size = len(group)
        max_blocks = max(len(decode_tables[i]) for i in group)
        values = [decode_rows[i] for i in group] + [decode_lens[i] for i in group]
        for i in group:
            table = decode_tables[i]
            values += table
            if len(table) < max_blocks:
                values += [0] * (max_blocks - len(table))
        packed = _long_tensor(values).to(device)  # rows, lens, then the padded tables: one conversion
        decode_groups.append(DecodeGroup(packed[:size], packed[2 * size:].view(size, max_blocks),
                                         packed[size:2 * size], bs))

    # the per-row index tensors in one tensor (one conversion, one copy to the device), then views
    flat = _long_tensor(token_ids + positions + slots + logits_rows).to(device)
    token_t, position_t, slot_t, logits_t = flat.split([row, row, row, len(logits_rows)])
    return ForwardBatch(
        token_ids=token_t,
        positions=position_t,
        slot_mapping=slot_t,
        query_lens=[len(c.token_ids) for c in chunks],
        context_lens=[c.end_position for c in chunks],
        logits_indices=logits_t,
        decode_groups=decode_groups,
        block_size_tokens=bs,
        prefill_segments=segments,
    )


def _long_tensor(values: list[int]) -> torch.Tensor:
    """An int64 CPU tensor of a list of ints (through numpy: several times faster than torch.tensor)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))
