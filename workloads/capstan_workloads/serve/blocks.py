"""KV block bookkeeping with prefix sharing: reference counts, a hash table of full blocks, copy-on-write.

Pure data structures (no torch): the scheduler decides, :class:`~.kvcache.PagedKVCache` moves bytes.

* Every full block of tokens is identified by a chained hash: ``hash(parent_hash, its token ids)``,
  so a hash names the whole prefix up to the end of that block (and therefore its positions too,
  which matters with learned position embeddings). Once written, a full block is published under
  its hash; a later prompt that starts with the same tokens takes a reference on it instead of
  recomputing it.
* A block is referenced by every sequence whose block table holds it (the ``n`` choices of one
  request share the prompt's blocks). A block whose count drops to zero goes back to the free list,
  or, if it is published, to an LRU list of cached blocks: still findable by hash, evicted (its
  hash dropped) only when the free list cannot cover an allocation.
* A sequence about to write into a block another sequence also holds (the prompt's partial last
  block, shared by a request's choices) first copies it into a block of its own: copy-on-write.
  Published blocks are full, so no sequence ever writes into one.

Capacity is reserved when a request is admitted (all blocks any of its choices can ever need,
copy-on-write copies included), so a running sequence never waits for memory.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field


class OutOfBlocks(RuntimeError):
    """The pool cannot provide the blocks a request asked for."""


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """Chained hash of one full block: names every token from position 0 to the block's end."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass
class BlockTable:
    """One sequence's view of the pool.

    ``blocks[i]`` holds positions ``i * block_tokens .. (i + 1) * block_tokens - 1``. ``hashes[i]``
    is the chained hash of block ``i`` once it is full (the chain starts at ``salt``). ``reserve``
    holds blocks set aside for copy-on-write. ``cached_tokens``: prompt positions found in the prefix
    cache at admission (their K/V need not be computed).
    """

    blocks: list[int]
    hashes: list[bytes] = field(default_factory=list)
    reserve: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    salt: bytes = b""  # starts the hash chain: K/V computed under a LoRA adapter is that adapter's own


@dataclass(frozen=True)
class Copy:
    """A copy-on-write the cache must perform before the next write: block ``src`` into ``dst``."""

    src: int
    dst: int


class BlockManager:
    """Reference-counted block pool with an optional prefix cache (``prefix_caching``)."""

    def __init__(self, num_blocks: int, block_tokens: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.prefix_caching = prefix_caching
        self.refcount = [0] * num_blocks
        # FIFO reuse spreads writes over the pool; order does not matter for correctness.
        self._free: deque[int] = deque(range(num_blocks))
        # Published blocks nobody references, least recently released first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}

    # ---- pool ------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now: free ones plus unreferenced cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Published blocks (referenced or not) that a prompt can hit."""
        return len(self._by_hash)

    def blocks_for(self, n_tokens: int) -> int:
        """Blocks needed to hold ``n_tokens`` tokens."""
        return math.ceil(n_tokens / self.block_tokens)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks (reference count 1), all or none; evicts cached blocks LRU when short."""
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._by_hash[self._hash_of.pop(block)]
            self.refcount[block] = 1
            out.append(block)
        return out

    def _acquire(self, block: int) -> None:
        if self.refcount[block] == 0:
            self._evictable.pop(block)  # a cached block comes back into use
        self.refcount[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks become free (or cached, if published)."""
        for block in blocks:
            if self.refcount[block] <= 0:
                raise RuntimeError(f"block {block} released more often than referenced")
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ---- prefix cache ----------------------------------------------------------------------------

    def prompt_hashes(self, prompt: Sequence[int], salt: bytes = b"") -> list[bytes]:
        """Chained hashes of the prompt's full blocks, the chain starting at ``salt``."""
        bt, parent, out = self.block_tokens, salt, []
        for i in range(len(prompt) // bt):
            parent = block_hash(parent, prompt[i * bt : (i + 1) * bt])
            out.append(parent)
        return out

    def lookup(self, hashes: Sequence[bytes], prompt_len: int) -> list[int]:
        """Cached blocks of the longest published prefix, without taking references.

        At least the prompt's last token is always left to compute: its logits give the first
        output token.
        """
        if not self.prefix_caching:
            return []
        hits = []
        for h in hashes[: (prompt_len - 1) // self.block_tokens]:
            block = self._by_hash.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def _publish(self, block: int, h: bytes) -> None:
        # First writer wins: a second block with the same content stays private and is freed normally.
        if self.prefix_caching and h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h] = block
            self._hash_of[block] = h

    def commit(self, table: BlockTable, tokens: Sequence[int]) -> None:
        """Record that ``tokens`` (the sequence so far) have their K/V written: publish newly full blocks."""
        bt = self.block_tokens
        parent = table.hashes[-1] if table.hashes else table.salt
        for i in range(len(table.hashes), len(tokens) // bt):
            parent = block_hash(parent, tokens[i * bt : (i + 1) * bt])
            table.hashes.append(parent)
            self._publish(table.blocks[i], parent)

    # ---- requests --------------------------------------------------------------------------------

    def _shape(self, prompt_len: int, n: int, fed_tokens: int) -> tuple[int, int, int]:
        """(shared prompt blocks, blocks of each choice's own, copy-on-write blocks of each choice)."""
        prompt_blocks = self.blocks_for(prompt_len)
        extra = self.blocks_for(max(prompt_len, fed_tokens)) - prompt_blocks
        # Choices write their own tokens into the prompt's partial last block: each may need a copy.
        cow = 1 if n > 1 and prompt_len % self.block_tokens and fed_tokens > prompt_len else 0
        return prompt_blocks, extra, cow

    def group_need(self, prompt_len: int, n: int, fed_tokens: int, hits: int = 0) -> int:
        """Blocks a request of ``n`` choices needs, given ``hits`` cached prompt blocks.

        ``fed_tokens``: positions a choice can ever write (prompt plus every output token but the last).
        """
        prompt_blocks, extra, cow = self._shape(prompt_len, n, fed_tokens)
        return prompt_blocks - hits + n * (extra + cow)

    def admit(
        self, prompt: Sequence[int], n: int, fed_tokens: int, salt: bytes = b""
    ) -> list[BlockTable] | None:
        """Block tables for the ``n`` choices of a request, sharing the prompt's blocks; None if short now.

        Nothing is taken when the request does not fit. ``salt`` keeps prompts computed under different
        weights (LoRA adapters) from sharing blocks.
        """
        hashes = self.prompt_hashes(prompt, salt)
        hits = self.lookup(hashes, len(prompt))
        # Taking a cached block nobody references removes it from what an allocation can use.
        idle_hits = sum(1 for b in hits if self.refcount[b] == 0)
        need = self.group_need(len(prompt), n, fed_tokens, len(hits))
        if need + idle_hits > self.num_free:
            return None
        for block in hits:
            self._acquire(block)
        prompt_blocks, extra, cow = self._shape(len(prompt), n, fed_tokens)
        shared = hits + self.allocate(prompt_blocks - len(hits))
        tables = []
        for i in range(n):
            if i:
                for block in shared:
                    self._acquire(block)
            tables.append(
                BlockTable(
                    blocks=shared + self.allocate(extra),
                    hashes=list(hashes[: len(hits)]),
                    reserve=self.allocate(cow),
                    cached_tokens=len(hits) * self.block_tokens,
                    salt=salt,
                )
            )
        return tables

    def prepare_write(self, table: BlockTable, position: int) -> Copy | None:
        """Make the block that will hold ``position`` private to ``table``; return the copy to perform."""
        index = position // self.block_tokens
        block = table.blocks[index]
        if self.refcount[block] == 1:
            return None
        if not table.reserve:
            raise OutOfBlocks(f"no block reserved for copy-on-write of block {block}")
        new = table.reserve.pop()
        self.release([block])
        table.blocks[index] = new
        return Copy(block, new)

    def free(self, table: BlockTable) -> None:
        """Release every block a sequence holds, reserve included."""
        self.release(table.blocks)
        self.release(table.reserve)
        table.blocks, table.reserve = [], []
