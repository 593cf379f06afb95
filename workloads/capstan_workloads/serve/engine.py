"""Batched prefill and decode over a paged KV cache, reusing the parameters of :class:`GPT`.

The math mirrors ``GPT.forward`` exactly (pre-LN blocks, learned positions, tied head); only the
attention inputs differ: keys and values come from the cache instead of being recomputed, so a
greedy continuation matches full-sequence recomputation up to float rounding. Prefill and decode
both read every key through the block tables, so a prompt whose first blocks were found in the
prefix cache runs the same code as one computed from scratch. Tensors live on the model's device
(CPU or CUDA); sampling runs on the CPU, where the per-request generators are.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from capstan_workloads.model import GPT, Block

from .adapters import Adapter, AdapterRows
from .kvcache import PagedKVCache


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding knobs (OpenAI semantics: temperature 0 means greedy)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # vLLM extension: always generate max_tokens (benchmarks, load tests)
    stop: tuple[str, ...] = ()  # output ends before the first of these strings
    n: int = 1  # choices generated for the prompt (they share its KV blocks)


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
        self.device = model.tok_emb.weight.device
        # Set when the model's linears are wrapped for LoRA adapters (serve.adapters).
        self.adapter_rows: AdapterRows | None = None

    def _tensor(self, data: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.long, device=self.device)

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

    def _adapters(self, rows: list[Adapter | None] | None) -> contextlib.AbstractContextManager[None]:
        """Route row ``i`` of this forward through adapter ``rows[i]`` (None: the base alone)."""
        if self.adapter_rows is None or not rows or not any(rows):
            return contextlib.nullcontext()
        return self.adapter_rows.use(rows, self.device)

    def prefill(
        self,
        prompts: list[list[int]],
        starts: list[int],
        block_tables: list[list[int]],
        adapters: list[Adapter | None] | None = None,
    ) -> torch.Tensor:
        """Compute ``prompt[start:]`` of each prompt (padded into one batch), return last-position logits.

        Positions before ``start`` are already in the cache (prefix hits); the new tokens' K/V are
        written first, then every query attends to its sequence's keys read through the block table.
        """
        model, cache, bt = self.model, self.cache, self.cache.block_tokens
        news = [p[s:] for p, s in zip(prompts, starts, strict=True)]
        if not all(news):
            raise ValueError("prefill needs at least one uncached token per prompt")
        lens = self._tensor([len(t) for t in news])
        t = int(lens.max())
        idx = self._tensor([n + [0] * (t - len(n)) for n in news])
        steps = torch.arange(t, device=self.device)
        valid = steps[None, :] < lens[:, None]  # (batch, time): real token, not padding
        # Padding rows take the last real position: a valid embedding, and at least one visible key.
        pos = self._tensor(starts)[:, None] + torch.minimum(steps[None, :], lens[:, None] - 1)
        slots = self._tensor(
            [
                s
                for p, st, tb in zip(prompts, starts, block_tables, strict=True)
                for s in cache.slots(tb, range(st, len(p)))
            ]
        )
        width = max(-(-len(p) // bt) for p in prompts)
        table = self._tensor([tb[:width] + [0] * (width - len(tb[:width])) for tb in block_tables])
        keys_pos = torch.arange(width * bt, device=self.device)
        mask = (keys_pos[None, None, :] <= pos[:, :, None])[:, None]  # (batch, 1, query, key)
        x = model.tok_emb(idx) + model.pos_emb(pos)
        with self._adapters(adapters):
            for layer, block in enumerate(self.blocks):
                q, k, v = block.attn.qkv(block.ln1(x)).split(self.cfg.n_embd, dim=2)
                cache.write(layer, slots, k[valid], v[valid])
                keys, values = cache.gather(layer, table)
                y = F.scaled_dot_product_attention(
                    self._heads(q), self._heads(keys), self._heads(values), attn_mask=mask
                )
                x = self._block_tail(block, x, y)
        last = x[torch.arange(len(prompts), device=self.device), lens - 1]
        return self._logits(last)

    def decode(
        self,
        tokens: list[int],
        positions: list[int],
        block_tables: list[list[int]],
        adapters: list[Adapter | None] | None = None,
    ) -> torch.Tensor:
        """One step for every running sequence in ONE forward: feed each its last token, return logits.

        The matmuls run on the whole batch at once (that is where batching pays). Attention reads
        K/V through the block tables in groups of ``attn_group`` sequences of similar length: each
        group's gathered K/V stays in the CPU cache between the gather and the attention, and
        padding is only up to the longest sequence of the group.
        """
        model, bt = self.model, self.cache.block_tokens
        b = len(tokens)
        order = sorted(range(b), key=positions.__getitem__)  # group similar lengths together
        spos = [positions[i] for i in order]
        pos = self._tensor(spos)
        tables = [block_tables[i] for i in order]
        groups = []
        for lo in range(0, b, self.attn_group):
            hi = min(lo + self.attn_group, b)
            gpos = pos[lo:hi]
            width = max(spos[lo:hi]) // bt + 1  # blocks the longest sequence of the group uses
            # Shorter tables are padded with block 0, whose rows the mask hides.
            table = self._tensor([t[:width] + [0] * (width - len(t[:width])) for t in tables[lo:hi]])
            keys_pos = torch.arange(width * bt, device=self.device)
            mask = (keys_pos[None, :] <= gpos[:, None])[:, None, None, :]  # (group, 1, 1, key)
            groups.append((lo, hi, table, mask))
        new_slots = self._tensor([t[p // bt] * bt + p % bt for t, p in zip(tables, spos, strict=True)])
        x = (model.tok_emb(self._tensor([tokens[i] for i in order])) + model.pos_emb(pos))[:, None, :]
        rows = [adapters[i] for i in order] if adapters else None
        with self._adapters(rows):
            x = self._decode_layers(x, new_slots, groups)
        logits = self._logits(x[:, 0])
        inverse = torch.empty(b, dtype=torch.long, device=self.device)
        inverse[self._tensor(order)] = torch.arange(b, device=self.device)
        return logits[inverse]

    def _decode_layers(
        self,
        x: torch.Tensor,
        new_slots: torch.Tensor,
        groups: list[tuple[int, int, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Every block of one decode step (rows in the sorted order of :meth:`decode`)."""
        cache = self.cache
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
        return x

    def sample(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> list[int]:
        """Pick one token per row: argmax for temperature 0, else temperature + nucleus (top-p) sampling."""
        # One device-to-host copy per step; the generators (and thus seeded results) live on the CPU.
        logits = logits[:, : self.sample_vocab].float().cpu()
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
