"""Export the trained model in the format the inference server loads.

Three files and nothing else: ``model.safetensors`` (un-wrapped parameter names, full tensors),
``config.json`` (:meth:`GPTConfig.to_json`) and ``tokenizer.json`` (:meth:`Tokenizer.save`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from .checkpoint import fsync_path
from .model import GPT, GPTConfig
from .tokenizer import Tokenizer

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.json"


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, un-wrapped fp32 CPU tensors of ``model`` (DDP, FSDP2 or plain); a collective under FSDP.

    Under a process group only rank 0 gets the tensors (the others get an empty dict), so the
    gathered model never has to fit in every rank's host memory at once.
    """
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    return {k: v.detach().float().contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _replace(tmp: Path, final: Path) -> None:
    fsync_path(tmp)
    os.replace(tmp, final)


def write_export(state: dict[str, torch.Tensor], cfg: GPTConfig, tokenizer: Tokenizer, out: Path) -> None:
    """Write the three files into ``out``; each appears atomically, the weights last."""
    out.mkdir(parents=True, exist_ok=True)
    tok_tmp, cfg_tmp, w_tmp = out / f".{TOKENIZER}.tmp", out / f".{CONFIG}.tmp", out / f".{WEIGHTS}.tmp"
    tokenizer.save(tok_tmp)
    cfg_tmp.write_text(cfg.to_json())
    save_file(state, str(w_tmp), metadata={"format": "pt"})
    os.chmod(w_tmp, 0o644)  # safetensors creates it owner-only; a server under another uid must read it
    _replace(tok_tmp, out / TOKENIZER)
    _replace(cfg_tmp, out / CONFIG)
    _replace(w_tmp, out / WEIGHTS)
    fsync_path(out)


def load_export(path: Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer]:
    """Load an export the way the inference server does (strict: every name must match)."""
    model = GPT(GPTConfig.from_file(path / CONFIG))
    model.load_state_dict(load_file(str(path / WEIGHTS), device=str(device)), strict=True)
    return model.to(device).eval(), Tokenizer.load(path / TOKENIZER)
