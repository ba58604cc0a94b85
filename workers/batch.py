"""ForwardBatch: one flat step over many sequences (prefill chunks and decode tokens mixed).

The coordinator describes a step as a list of ``SequenceChunk`` (the new tokens of each
sequence, where they start, and the sequence's KV block table). ``build_batch`` turns that into
the flat tensors the model reads: token ids, positions, the KV slot of every new token, which
rows need logits, and the gather indices/masks attention uses — computed once per step, shared
by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor            # [T] int64
    positions: torch.Tensor            # [T] int64
    slot_mapping: torch.Tensor         # [T] int64, KV slot of each new token
    query_lens: list[int]
    context_lens: list[int]            # KV length of each sequence after this step
    logits_indices: torch.Tensor       # [N] rows of the flat batch that get logits
    decode_rows: torch.Tensor          # [B] rows of single-token sequences
    decode_slots: torch.Tensor         # [B, Lmax] their context slots (padded)
    decode_mask: torch.Tensor          # [B, Lmax] True where a slot is real
    prefill_segments: list[tuple[int, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])


def _slots(block_table: torch.Tensor, positions: torch.Tensor, block_size_tokens: int) -> torch.Tensor:
    return block_table[positions // block_size_tokens] * block_size_tokens + positions % block_size_tokens


def build_batch(chunks: list[SequenceChunk], block_size_tokens: int,
                device: torch.device | str = "cpu") -> ForwardBatch:
    """Flatten ``chunks`` into one ForwardBatch (sequences keep their order)."""
    if not chunks:
        raise ValueError("build_batch needs at least one sequence chunk")
    token_ids: list[int] = []
    positions: list[torch.Tensor] = []
    slots: list[torch.Tensor] = []
    logits_rows: list[int] = []
    decode_rows: list[int] = []
    decode_tables: list[torch.Tensor] = []
    decode_lens: list[int] = []
    segments: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    row = 0
    for chunk in chunks:
        n = len(chunk.token_ids)
        if n == 0:
            raise ValueError("a sequence chunk has no tokens")
        needed_blocks = -(-chunk.end_position // block_size_tokens)
        if len(chunk.block_table) < needed_blocks:
            raise ValueError(f"block table has {len(chunk.block_table)} blocks, "
                             f"{needed_blocks} needed for {chunk.end_position} tokens")
        if not 0 <= chunk.num_logits <= n:
            raise ValueError(f"num_logits={chunk.num_logits} outside [0, {n}]")
        table = torch.tensor(chunk.block_table, dtype=torch.long)
        pos = torch.arange(chunk.start_position, chunk.end_position, dtype=torch.long)
        token_ids.extend(chunk.token_ids)
        positions.append(pos)
        slots.append(_slots(table, pos, block_size_tokens))
        logits_rows.extend(range(row + n - chunk.num_logits, row + n))
        if n == 1:
            decode_rows.append(row)
            decode_tables.append(table)
            decode_lens.append(chunk.end_position)
        else:
            context = _slots(table, torch.arange(chunk.end_position), block_size_tokens)
            mask = torch.arange(chunk.end_position)[None, :] <= pos[:, None]
            segments.append((row, n, context.to(device), mask.to(device)))
        row += n

    if decode_rows:
        max_len = max(decode_lens)
        span = torch.arange(max_len)
        decode_mask = span[None, :] < torch.tensor(decode_lens)[:, None]
        max_blocks = max(len(t) for t in decode_tables)
        tables = torch.zeros(len(decode_tables), max_blocks, dtype=torch.long)
        for i, t in enumerate(decode_tables):
            tables[i, :len(t)] = t
        block_idx = (span // block_size_tokens).clamp(max=max_blocks - 1)
        decode_slots = tables[:, block_idx] * block_size_tokens + span % block_size_tokens
        decode_slots = torch.where(decode_mask, decode_slots, 0)
    else:
        decode_mask = torch.zeros(0, 0, dtype=torch.bool)
        decode_slots = torch.zeros(0, 0, dtype=torch.long)

    return ForwardBatch(
        token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slots).to(device),
        query_lens=[len(c.token_ids) for c in chunks],
        context_lens=[c.end_position for c in chunks],
        logits_indices=torch.tensor(logits_rows, dtype=torch.long, device=device),
        decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
        decode_slots=decode_slots.to(device),
        decode_mask=decode_mask.to(device),
        prefill_segments=segments,
    )
