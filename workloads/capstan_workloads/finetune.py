"""Fine-tuning setup and export for ``--task sft``: full fine-tuning or LoRA from a base export.

The base is an export of a pre-training run (``model.safetensors``, ``config.json``,
``tokenizer.json``), usually found in the checkpoint volume a TrainingJob's
``checkpoint.restoreFrom`` seeded from the pre-training job's snapshot. The fine-tune keeps its own
checkpoints, losses and exports under ``CHECKPOINT_DIR/sft`` so it never mixes with the base's
``step-*`` directories it was restored next to.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .export import CONFIG, TOKENIZER, WEIGHTS, write_export
from .lora import (
    adapter_config,
    adapter_tensors,
    apply_lora,
    fingerprint,
    merged_tensors,
    write_adapter,
)
from .model import GPT, GPTConfig
from .sft import HELDOUT_SEED, TRAIN_SEED, SFTExamples, check_vocabulary, generate_pairs
from .tokenizer import Tokenizer

log = logging.getLogger("capstan.train")
EVAL_FILE = "eval.json"


@dataclass
class FineTune:
    """What the training loop needs from a fine-tune set-up."""

    model: GPT
    tokenizer: Tokenizer
    train: SFTExamples
    heldout: SFTExamples
    base: Path
    base_fingerprint: str
    targets: list[str]  # adapted module names (empty: full fine-tuning)

    @property
    def lora(self) -> bool:
        return bool(self.targets)


def load_base(base: Path, dropout: float, device: torch.device) -> tuple[GPT, Tokenizer, str]:
    """The base model (strict load: every name must match), its tokenizer and its fingerprint."""
    missing = [n for n in (WEIGHTS, CONFIG, TOKENIZER) if not (base / n).is_file()]
    if missing:
        raise FileNotFoundError(f"--base-model {base}: missing {', '.join(missing)} (an export of a "
                                "pre-training run: model.safetensors, config.json, tokenizer.json)")
    cfg = GPTConfig.from_file(base / CONFIG)
    cfg.dropout = dropout
    with torch.device(device):
        model = GPT(cfg)
    model.load_state_dict(load_file(str(base / WEIGHTS), device=str(device)), strict=True)
    return model, Tokenizer.load(base / TOKENIZER), fingerprint(base / WEIGHTS)


def prepare(args: argparse.Namespace, device: torch.device) -> FineTune:
    """Load the base, build the task's examples and (``--lora-rank``) wrap the targeted linears."""
    model, tok, fp = load_base(args.base_model, args.dropout, device)
    train_pairs = generate_pairs(args.sft_examples, TRAIN_SEED)
    heldout_pairs = generate_pairs(args.heldout_examples, HELDOUT_SEED)
    check_vocabulary(tok, train_pairs + heldout_pairs, args.base_model)
    seq_len = model.cfg.block_size
    train, heldout = SFTExamples(tok, train_pairs, seq_len), SFTExamples(tok, heldout_pairs, seq_len)
    targets: list[str] = []
    if args.lora_rank:
        # Same seed on every rank: the adapters' random init must agree before DDP's first broadcast.
        torch.manual_seed(args.seed)
        targets = apply_lora(model, args.lora_targets, args.lora_rank, args.lora_alpha)
    return FineTune(model, tok, train, heldout, args.base_model, fp, targets)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors on this rank (AdamW: two moments per trainable value)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor) and v.ndim > 0
    )


def export(ft: FineTune, weights: dict[str, torch.Tensor], args: argparse.Namespace) -> list[Path]:
    """Rank 0: write the adapter (LoRA) and/or the full model; return the directories written."""
    cfg = ft.model.cfg
    written = []
    if ft.lora:
        config = adapter_config(args.lora_rank, args.lora_alpha, args.lora_targets, str(ft.base),
                                ft.base_fingerprint, json.loads(cfg.to_json()))
        write_adapter(adapter_tensors(weights), config, args.adapter_dir)
        written.append(args.adapter_dir)
        if args.merge:
            write_export(merged_tensors(weights, args.lora_alpha / args.lora_rank), cfg, ft.tokenizer,
                         args.export_dir)
            written.append(args.export_dir)
    else:
        write_export(weights, cfg, ft.tokenizer, args.export_dir)
        written.append(args.export_dir)
    return written


def write_eval(path: Path, record: Mapping[str, object]) -> None:
    """The run's figures (held-out loss, parameter and optimizer-state sizes) as JSON."""
    path.write_text(json.dumps(record, indent=1) + "\n")
