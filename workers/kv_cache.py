"""Paged KV cache: fixed-size blocks of token slots, a free list, and one K and one V tensor.

Every layer (the MTP layer included, as the last one) shares the block tables: a sequence that
owns block ``b`` owns slots ``b*block_size .. b*block_size + block_size - 1`` in every layer.
One tensor holds all layers so the memory is allocated once; each layer reads a view of it.
"""

from __future__ import annotations

from collections import deque

import torch

from workers.config import ModelConfig


class NoFreeBlocks(RuntimeError):
    """The cache cannot give the blocks asked for; the scheduler preempts instead of failing."""


class BlockAllocator:
    """A free list of block ids; allocation and release are O(blocks)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks={num_blocks} must be positive")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise NoFreeBlocks(f"asked for {count} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(count)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            if block not in self._used:
                raise ValueError(f"KV block {block} is not allocated")
            self._used.remove(block)
            self._free.append(block)


def blocks_needed(num_tokens: int, block_size_tokens: int) -> int:
    return -(-num_tokens // block_size_tokens)


class PagedKVCache:
    """K and V slot tensors ``[num_layers, Hkv, num_blocks * block_size, D]``.

    Head-major, so one KV head's slots of a block are contiguous: gathering a sequence's blocks
    per head gives the ``[L, D]`` matrices attention multiplies with, without another copy.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size_tokens: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 include_mtp: bool = True) -> None:
        self.block_size_tokens = block_size_tokens
        self.num_blocks = num_blocks
        self.num_layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
        shape = (self.num_layers, config.num_key_value_heads, num_blocks * block_size_tokens, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"KV cache has no layer {index} (it holds {self.num_layers})")
        return self.k[index], self.v[index]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size_tokens: int, dtype: torch.dtype,
                        include_mtp: bool = True) -> int:
        layers = config.num_hidden_layers + (config.num_nextn_predict_layers if include_mtp else 0)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        return 2 * layers * block_size_tokens * config.num_key_value_heads * config.head_dim * itemsize
