"""Paged KV cache: a fixed pool of fixed-size blocks, a free list, and a block table per sequence.

In the spirit of vLLM's PagedAttention: a sequence's keys and values live in blocks that need not
be contiguous, so memory is never fragmented and a finished sequence returns its blocks at once.
Attention reads a sequence's K/V through its block table (a gather), which on CPU is cheap next to
the matmuls. Which blocks a sequence holds, and which it shares with others (prefix caching,
copy-on-write), is decided by the pure :class:`~.blocks.BlockManager`; this module only holds the
tensors and moves bytes.
"""

from __future__ import annotations

import torch

from .blocks import BlockManager, Copy


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
        device: torch.device | str = "cpu",
        prefix_caching: bool = True,
    ) -> None:
        self.block_tokens = block_tokens
        self.manager = BlockManager(num_blocks, block_tokens, prefix_caching)
        self.k = torch.zeros(n_layer, num_blocks, block_tokens, n_embd, dtype=dtype, device=device)
        self.v = torch.zeros(n_layer, num_blocks, block_tokens, n_embd, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        """Total blocks in the pool."""
        return self.manager.num_blocks

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` tokens."""
        return self.manager.blocks_for(n_tokens)

    def copy(self, copies: list[Copy]) -> None:
        """Perform copy-on-writes: every layer's K and V of each ``src`` block into its ``dst`` block."""
        if not copies:
            return
        src = torch.tensor([c.src for c in copies], device=self.k.device)
        dst = torch.tensor([c.dst for c in copies], device=self.k.device)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

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
