"""A character-level tokenizer that the trainer builds from its own corpus (no download)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

# Fixed ids so a served model can always pad and mark sequence ends.
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


@dataclass
class Tokenizer:
    """Maps characters to ids; ids 0-3 are the special tokens."""

    chars: list[str]
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    @classmethod
    def build(cls, texts: Iterable[str]) -> Tokenizer:
        """Build the vocabulary from every distinct character in ``texts`` (sorted: deterministic)."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(sorted(seen))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return len(SPECIALS) + len(self.chars)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Encode text; unknown characters map to ``<unk>``."""
        ids = [self._index.get(c, self.unk_id) for c in text]
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids, dropping special tokens."""
        offset = len(SPECIALS)
        return "".join(self.chars[i - offset] for i in ids if offset <= i < self.vocab_size)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json``."""
        Path(path).write_text(json.dumps({"type": "char", "specials": list(SPECIALS), "chars": self.chars}))

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read a tokenizer written by :meth:`save`."""
        data = json.loads(Path(path).read_text())
        if data.get("type") != "char":
            raise ValueError(f"{path}: unsupported tokenizer type {data.get('type')!r}")
        return cls(list(data["chars"]))
