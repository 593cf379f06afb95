"""Load an exported model directory (``model.safetensors``, ``config.json``, ``tokenizer.json``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.tokenizer import Tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


class ModelDirError(ValueError):
    """The model directory is missing files or its files disagree with each other."""


@dataclass
class LoadedModel:
    """A model ready for inference plus the tokenizer it was trained with."""

    model: GPT
    config: GPTConfig
    tokenizer: Tokenizer


def load_model_dir(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load and validate an exported model dir; raise :class:`ModelDirError` with a precise reason."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelDirError(f"model dir {root} does not exist")
    missing = [name for name in (WEIGHTS, CONFIG, TOKENIZER) if not (root / name).is_file()]
    if missing:
        raise ModelDirError(f"model dir {root} is missing {', '.join(missing)}")
    try:
        config = GPTConfig.from_file(root / CONFIG)
    except (ValueError, TypeError) as exc:
        raise ModelDirError(f"{root / CONFIG}: {exc}") from exc
    tokenizer = Tokenizer.load(root / TOKENIZER)
    if tokenizer.vocab_size > config.vocab_size:
        # A smaller tokenizer is fine (the trainer may round vocab_size up); a larger one would
        # produce ids the embedding table cannot look up.
        raise ModelDirError(
            f"tokenizer has {tokenizer.vocab_size} ids but config.vocab_size is {config.vocab_size}"
        )
    model = GPT(config)
    state = load_file(str(root / WEIGHTS))
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k}: shape {tuple(state[k].shape)} != expected {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} problems)" if len(problems) > 5 else "")
        raise ModelDirError(f"{root / WEIGHTS} does not match {CONFIG}: {shown}")
    model.load_state_dict(state)
    model.to(dtype).eval()
    return LoadedModel(model=model, config=config, tokenizer=tokenizer)


def export_model_dir(model: GPT, tokenizer: Tokenizer, model_dir: str | Path) -> Path:
    """Write the three files the server loads (used by tests and the benchmark; the trainer has its own)."""
    from safetensors.torch import save_file

    root = Path(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    # Tied weights share storage; safetensors refuses shared tensors, so clone each one.
    save_file(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(root / WEIGHTS)
    )
    (root / CONFIG).write_text(model.cfg.to_json())
    tokenizer.save(root / TOKENIZER)
    return root
