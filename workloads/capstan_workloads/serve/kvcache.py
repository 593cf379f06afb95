"""Paged KV cache: a fixed pool of fixed-size blocks, a free list, and a block table per sequence.

In the spirit of vLLM's PagedAttention: a sequence's keys and values live in blocks that need not
be contiguous, so memory is never fragmented and a finished sequence returns its blocks at once.
Attention reads a sequence's K/V through its block table (a gather), which on CPU is cheap next to
the matmuls.
"""

from __future__ import annotations

import math
from collections import deque

import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request asked for."""


class BlockAllocator:
    """Free-list allocator over block ids ``0..num_blocks-1``."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        self.num_blocks = num_blocks
        # FIFO reuse spreads writes over the pool; order does not matter for correctness.
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks available for allocation."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks currently owned by some sequence."""
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the free list, all or none."""
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        """Return blocks to the free list."""
        self._free.extend(blocks)


class PagedKVCache:
    """K and V pools of shape ``(n_layer, num_blocks, block_tokens, n_embd)``.

    Heads stay fused in the last dim so one copy moves a token's K (or V) for every head. Writes
    address single tokens by slot (``block_id * block_tokens + offset``); reads gather whole blocks,
    which moves the same bytes as a per-token gather with ``block_tokens`` times fewer indices.
    """

    def __init__(
        self,
        n_layer: int,
        n_embd: int,
        num_blocks: int,
        block_tokens: int = 16,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.block_tokens = block_tokens
        self.allocator = BlockAllocator(num_blocks)
        self.k = torch.zeros(n_layer, num_blocks, block_tokens, n_embd, dtype=dtype)
        self.v = torch.zeros(n_layer, num_blocks, block_tokens, n_embd, dtype=dtype)

    @property
    def num_blocks(self) -> int:
        """Total blocks in the pool."""
        return self.allocator.num_blocks

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` tokens."""
        return math.ceil(n_tokens / self.block_tokens)

    def slots(self, block_table: list[int], positions: range | list[int]) -> list[int]:
        """Flat slot index of each position of a sequence with this block table."""
        bt = self.block_tokens
        return [block_table[p // bt] * bt + p % bt for p in positions]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V rows (``(n, n_embd)``) for one layer at the given flat slots."""
        c = k.shape[-1]
        self.k[layer].view(-1, c).index_copy_(0, slots, k)
        self.v[layer].view(-1, c).index_copy_(0, slots, v)

    def gather(self, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V for a ``(batch, blocks)`` block table, shaped ``(batch, blocks * block_tokens, n_embd)``.

        Token ``j`` of sequence ``i`` is row ``j`` of the result; rows past a sequence's length hold
        stale data and must be masked by the caller.
        """
        b, nb = tables.shape
        flat = tables.reshape(-1)
        shape = (b, nb * self.block_tokens, self.k.shape[-1])
        return self.k[layer].index_select(0, flat).view(shape), self.v[layer].index_select(0, flat).view(
            shape
        )
