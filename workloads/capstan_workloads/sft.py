"""Supervised fine-tuning data: a generated instruction task over the pre-training vocabulary.

No download, deterministic: each example is a prompt and a response in the words of the
pre-training corpus (:mod:`capstan_workloads.data`), so the base model's character tokenizer covers
every character. Two instructions the base never saw:

* ``reverse the gang saves`` -> ``saves gang the.``
* ``7 times 8`` -> ``56.``

An example is ``<bos> prompt \\n response <eos>``; the loss counts the response and ``<eos>`` only
(targets of the prompt positions and of the padding are -1, which the model's loss ignores).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .data import _SUBJECTS, _VERBS
from .tokenizer import Tokenizer

IGNORE = -1
#: Seeds of the training and held-out example sets (disjoint streams of the same task).
TRAIN_SEED, HELDOUT_SEED = 4321, 8765


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, response) pairs of the instruction task, a pure function of ``seed``."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        if rng.random() < 0.7:
            # Subject and verb only: the longest example fits the default 64-token block size.
            words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}".split()
            pairs.append((f"reverse {' '.join(words)}", " ".join(reversed(words)) + "."))
        else:
            a, b = rng.randrange(10), rng.randrange(10)
            pairs.append((f"{a} times {b}", f"{a * b}."))
    return pairs


def encode_pair(
    tok: Tokenizer, prompt: str, response: str, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of ``seq_len`` tokens; targets are -1 except on the response and ``<eos>``."""
    head = tok.encode(prompt + "\n", bos=True)
    tail = [*tok.encode(response), tok.eos_id]
    ids = head + tail
    if len(ids) > seq_len + 1:
        raise ValueError(
            f"an sft example of {len(ids)} tokens does not fit the base model's block_size {seq_len}"
        )
    targets = [IGNORE] * (len(head) - 1) + tail
    pad = seq_len + 1 - len(ids)
    x = ids[:-1] + [tok.pad_id] * pad
    y = targets + [IGNORE] * pad
    return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)


def check_vocabulary(tok: Tokenizer, pairs: list[tuple[str, str]], base: Path) -> None:
    """Fail clearly when the task uses a character the base model's tokenizer does not know."""
    known = set(tok.chars)
    missing = sorted({c for p, r in pairs for c in p + r + "\n"} - known)
    if missing:
        raise ValueError(f"--base-model {base}: its tokenizer lacks characters the sft task uses: {missing}")


class SFTExamples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Encoded (inputs, masked targets) pairs, all padded to ``seq_len``."""

    def __init__(self, tok: Tokenizer, pairs: list[tuple[str, str]], seq_len: int) -> None:
        self.items = [encode_pair(tok, p, r, seq_len) for p, r in pairs]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]

    def batches(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every example once, in order (for held-out evaluation)."""
        out = []
        for lo in range(0, len(self.items), batch_size):
            chunk = self.items[lo : lo + batch_size]
            out.append((torch.stack([x for x, _ in chunk]), torch.stack([y for _, y in chunk])))
        return out


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, examples: SFTExamples, device: torch.device, batch_size: int = 64
) -> float:
    """Mean cross-entropy per response token over ``examples`` (the same tokens for every model)."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for x, y in examples.batches(batch_size):
        x, y = x.to(device), y.to(device)
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += float(loss)
        count += int((y != IGNORE).sum())
    model.train(was_training)
    return total / max(1, count)
