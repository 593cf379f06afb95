"""Batched prefill and decode over a paged KV cache, reusing the parameters of :class:`GPT`.

The math mirrors ``GPT.forward`` exactly (pre-LN blocks, learned positions, tied head); only the
attention inputs differ: keys and values come from the cache instead of being recomputed, so a
greedy continuation matches full-sequence recomputation up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from capstan_workloads.model import GPT, Block

from .kvcache import PagedKVCache


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding knobs (OpenAI semantics: temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM extension: always generate max_tokens (benchmarks, load tests)


class Engine:
    """Runs the GPT's weights over many sequences at once, reading K/V through block tables."""

    def __init__(
        self, model: GPT, cache: PagedKVCache, sample_vocab: int | None = None, attn_group: int = 8
    ) -> None:
        self.model = model
        self.cfg = model.cfg
        self.cache = cache
        self.blocks = [cast(Block, b) for b in model.blocks]  # typed view of the ModuleList
        self.n_head = self.cfg.n_head
        self.head_dim = self.cfg.n_embd // self.cfg.n_head
        # Ids past the tokenizer's vocabulary (a rounded-up embedding table) can never be decoded.
        self.sample_vocab = sample_vocab or self.cfg.vocab_size
        self.attn_group = attn_group

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, time, n_embd) -> (batch, n_head, time, head_dim)."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)

    def _block_tail(self, block: Block, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and MLP of one block, given the attention output ``y``."""
        b, t, c = x.shape
        x = x + block.attn.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + block.mlp(block.ln2(x))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Tied head on the final hidden states of the positions we sample from."""
        return self.model.ln_f(h) @ self.model.tok_emb.weight.T

    def prefill(self, prompts: list[list[int]], block_tables: list[list[int]]) -> torch.Tensor:
        """Run whole prompts (padded into one batch), fill their cache slots, return last-position logits."""
        model, cache = self.model, self.cache
        lens = torch.tensor([len(p) for p in prompts])
        t = int(lens.max())
        idx = torch.zeros(len(prompts), t, dtype=torch.long)
        for i, p in enumerate(prompts):
            idx[i, : len(p)] = torch.tensor(p)
        pos = torch.arange(t)
        valid = pos[None, :] < lens[:, None]  # (batch, time): real token, not padding
        # Only real tokens are written to the cache; padding rows are computed and thrown away.
        slots = torch.tensor(
            [s for p, bt in zip(prompts, block_tables, strict=True) for s in cache.slots(bt, range(len(p)))]
        )
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = (causal[None] & valid[:, None, :])[:, None]  # (batch, 1, query, key)
        x = model.tok_emb(idx) + model.pos_emb(pos)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.qkv(block.ln1(x)).split(self.cfg.n_embd, dim=2)
            cache.write(layer, slots, k[valid], v[valid])
            y = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=mask)
            x = self._block_tail(block, x, y)
        last = x[torch.arange(len(prompts)), lens - 1]
        return self._logits(last)

    def decode(self, tokens: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One step for every running sequence in ONE forward: feed each its last token, return logits.

        The matmuls run on the whole batch at once (that is where batching pays). Attention reads
        K/V through the block tables in groups of ``attn_group`` sequences of similar length: each
        group's gathered K/V stays in the CPU cache between the gather and the attention, and
        padding is only up to the longest sequence of the group.
        """
        model, cache, bt = self.model, self.cache, self.cache.block_tokens
        b = len(tokens)
        order = sorted(range(b), key=positions.__getitem__)  # group similar lengths together
        pos = torch.tensor([positions[i] for i in order])
        tables = [block_tables[i] for i in order]
        groups = []
        for lo in range(0, b, self.attn_group):
            hi = min(lo + self.attn_group, b)
            gpos = pos[lo:hi]
            width = int(gpos.max()) // bt + 1  # blocks the longest sequence of the group uses
            # Shorter tables are padded with block 0, whose rows the mask hides.
            table = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables[lo:hi]])
            keys_pos = torch.arange(width * bt)
            mask = (keys_pos[None, :] <= gpos[:, None])[:, None, None, :]  # (group, 1, 1, key)
            groups.append((lo, hi, table, mask))
        new_slots = torch.tensor(
            [t[p // bt] * bt + p % bt for t, p in zip(tables, pos.tolist(), strict=True)]
        )
        x = (model.tok_emb(torch.tensor([tokens[i] for i in order])) + model.pos_emb(pos))[:, None, :]
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.qkv(block.ln1(x)).split(self.cfg.n_embd, dim=2)
            cache.write(layer, new_slots, k[:, 0], v[:, 0])
            ys = []
            for lo, hi, table, mask in groups:
                keys, values = cache.gather(layer, table)
                ys.append(
                    F.scaled_dot_product_attention(
                        self._heads(q[lo:hi]), self._heads(keys), self._heads(values), attn_mask=mask
                    )
                )
            x = self._block_tail(block, x, torch.cat(ys) if len(ys) > 1 else ys[0])
        logits = self._logits(x[:, 0])
        inverse = torch.empty(b, dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(b)
        return logits[inverse]

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """Pick one token per row: argmax for temperature 0, else temperature + nucleus (top-p) sampling."""
        logits = logits[:, : self.sample_vocab].float()
        out = logits.argmax(dim=-1).tolist()
        for i, p in enumerate(params):
            if p.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
                keep = (sorted_p.cumsum(0) - sorted_p) < p.top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]).item())
        return out
