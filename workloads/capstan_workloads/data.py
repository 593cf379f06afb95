"""Training data: a generated corpus (no download), token windows and a resumable sharded stream."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .tokenizer import Tokenizer

_SUBJECTS = [
    "the operator", "a worker", "the scheduler", "every pod", "the trainer", "a gpu", "the server",
    "the checkpoint", "a node", "the controller", "each replica", "the gang", "a rack", "the model",
]
_VERBS = [
    "restarts", "watches", "places", "saves", "loads", "schedules", "exports", "reads", "writes",
    "serves", "trains", "drains", "labels", "shards",
]
_OBJECTS = [
    "the job", "a checkpoint", "the weights", "its state", "the queue", "every batch", "the tokens",
    "a snapshot", "the cluster", "the volume", "the rollout", "its peers", "the gradients",
]
_ADVERBS = ["quickly", "again", "at once", "in order", "on time", "with care", "every step", "safely"]


def generate_corpus(n_chars: int, seed: int = 1234) -> str:
    """Deterministic English-like text of about ``n_chars`` characters.

    The grammar is small and regular on purpose: a tiny model learns it within a few dozen steps,
    so CI can check that the loss goes down. The seed is independent of the training seed, so every
    run (and every rank) sees the same corpus and builds the same tokenizer.
    """
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_chars:
        # Draw in bulk: per-sentence random calls made this the slowest part of start-up.
        k = 4096
        subj, verb, obj = rng.choices(_SUBJECTS, k=k), rng.choices(_VERBS, k=k), rng.choices(_OBJECTS, k=k)
        adv, coins = rng.choices(_ADVERBS, k=k), rng.choices(range(20), k=k)
        digits = rng.choices(range(10), k=2 * k)
        for i in range(k):
            c = coins[i]
            if c < 4:  # a little arithmetic: exact structure the model can pick up
                a, b = digits[2 * i], digits[2 * i + 1]
                sentence = f"{a} plus {b} is {a + b}."
            elif c < 12:
                sentence = f"{subj[i].capitalize()} {verb[i]} {obj[i]} {adv[i]}."
            else:
                sentence = f"{subj[i].capitalize()} {verb[i]} {obj[i]}."
            sentence += "\n" if c in (0, 7) else " "
            parts.append(sentence)
            size += len(sentence)
    return "".join(parts)[:n_chars]


def load_corpus(path: str | None, n_chars: int) -> str:
    """The text to train on: the file at ``path`` (UTF-8) or a generated corpus of ``n_chars``."""
    if path:
        return Path(path).read_text(encoding="utf-8")
    return generate_corpus(n_chars)


class TokenWindows(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping windows of ``seq_len`` tokens; targets are the inputs shifted by one."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.numel() < seq_len + 1:
            raise ValueError(f"corpus has {tokens.numel()} tokens, need at least seq_len + 1 = {seq_len + 1}")
        self.tokens = tokens
        self.seq_len = seq_len

    @classmethod
    def from_text(cls, text: str, tokenizer: Tokenizer, seq_len: int) -> TokenWindows:
        """Encode ``text`` with ``tokenizer`` and cut it into windows."""
        return cls(torch.tensor(tokenizer.encode(text), dtype=torch.long), seq_len)

    def __len__(self) -> int:
        return (self.tokens.numel() - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1]
        return chunk[:-1], chunk[1:]


class ResumableSampler(DistributedSampler[int]):
    """A ``DistributedSampler`` that can start part-way through an epoch.

    The shuffle order is a pure function of (seed, epoch), so the position to resume from is just
    the epoch and how many of this rank's samples were already consumed in it.
    """

    def __init__(self, dataset: Dataset[Any], num_replicas: int, rank: int, seed: int) -> None:
        # drop_last keeps every rank at the same number of batches, so no rank waits in a collective.
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start :])

    def __len__(self) -> int:
        return self.num_samples - self.start


class DataStream:
    """Endless stream of (inputs, targets) batches for this rank with a checkpointable position.

    Implements the DCP ``Stateful`` protocol so the position is saved and restored with the model.
    """

    def __init__(
        self,
        dataset: Dataset[tuple[torch.Tensor, torch.Tensor]],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        self.sampler = ResumableSampler(dataset, world_size, rank, seed)
        if self.sampler.num_samples < batch_size:
            raise ValueError(
                f"each rank gets {self.sampler.num_samples} windows per epoch, fewer than batch size "
                f"{batch_size}: use a bigger corpus or a smaller --batch-size/--seq-len"
            )
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, drop_last=True)
        self.batch_size = batch_size
        self.epoch = 0
        self.consumed = 0  # samples of this epoch already handed out on this rank
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None

    def _restart(self) -> None:
        self.sampler.set_epoch(self.epoch)
        self.sampler.start = self.consumed
        self._it = iter(self.loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, moving to the next epoch (a new shuffle) when this one runs out."""
        if self._it is None:
            self._restart()
        assert self._it is not None
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.consumed = self.epoch + 1, 0
            self._restart()
            batch = next(self._it)
        self.consumed += self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position: epoch and samples consumed in it (identical on every rank)."""
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position from :meth:`state_dict`; the next batch is the one after it."""
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])
        self._it = None
