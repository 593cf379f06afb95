"""LoRA for the reference GPT: a hand-written adapter layer and PEFT's on-disk adapter format.

``peft`` is not a dependency: it pulls in ``transformers``/``accelerate`` and expects a Hugging Face
model class, while the reference GPT is a plain ``nn.Module``. The layer is a dozen lines; what has
to match PEFT exactly is the file format, so vLLM-style loaders (and ``peft`` itself, given a
matching base) read the adapter:

* ``adapter_config.json``: ``peft_type: LORA``, ``r``, ``lora_alpha``, ``target_modules``,
  ``base_model_name_or_path``, plus a ``capstan`` block with the base's fingerprint and shape;
* ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r x in) and
  ``base_model.model.<module>.lora_B.weight`` (out x r) per adapted module.

Target modules use PEFT's matching: a module is adapted when its name equals a target or ends with
``.<target>``; only ``nn.Linear`` modules qualify. In the GPT those are ``attn.qkv``, ``attn.proj``,
``mlp.fc`` and ``mlp.proj`` of every block (``proj`` alone selects both projections).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """Bad LoRA settings or a malformed adapter; the message names the setting or file."""


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) * B(A(x))`` with ``base`` frozen; B starts at zero, so training
    starts exactly at the base model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling


def matches(name: str, targets: Iterable[str]) -> bool:
    """PEFT's rule: ``name`` is adapted when it equals a target or ends with ``.<target>``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` in ``model`` (what LoRA can adapt)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """The linear modules ``targets`` select; :class:`LoRAError` when a target selects none."""
    names = linear_names(model)
    for t in targets:
        if not any(matches(n, [t]) for n in names):
            suffixes = sorted({".".join(n.split(".")[-2:]) for n in names}
                              | {n.split(".")[-1] for n in names})
            raise LoRAError(f"--lora-targets: {t!r} matches no linear layer of the model; "
                            f"choose from {', '.join(suffixes)}")
    return [n for n in names if matches(n, targets)]


def apply_lora(model: nn.Module, targets: list[str], r: int, alpha: float) -> list[str]:
    """Freeze ``model`` and wrap the targeted linears in :class:`LoRALinear`; return their names."""
    if r < 1:
        raise LoRAError(f"--lora-rank must be >= 1, got {r}")
    chosen = target_names(model, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attr)
        if r > min(base.in_features, base.out_features):
            raise LoRAError(f"--lora-rank {r} exceeds the smallest dimension of {name} "
                            f"({base.in_features} x {base.out_features})")
        setattr(parent, attr, LoRALinear(base, r, alpha))
    return chosen


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- state dicts: pure functions over {name: tensor} ----------------------------------------------


def lora_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """Module names that carry an adapter in a training state dict (``<m>.lora_A.weight``)."""
    return sorted(k.removesuffix(".lora_A.weight") for k in state if k.endswith(".lora_A.weight"))


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter alone, under PEFT's key names."""
    out = {}
    for m in lora_modules(state):
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{m}.{part}.weight"] = state[f"{m}.{part}.weight"].contiguous()
    return out


def merged_tensors(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """The base model's names and shapes, with ``W + scaling * B @ A`` folded into each adapted linear."""
    out: dict[str, torch.Tensor] = {}
    adapted = set(lora_modules(state))
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        owner, _, part = module.rpartition(".")
        if part in ("lora_A", "lora_B") and owner in adapted:
            continue
        if part == "base" and owner in adapted:
            if leaf == "weight":
                delta = state[f"{owner}.lora_B.weight"].float() @ state[f"{owner}.lora_A.weight"].float()
                value = value.float() + scaling * delta
            out[f"{owner}.{leaf}"] = value.contiguous()
        else:
            out[key] = value.contiguous()
    return out


def fingerprint(weights: Path) -> str:
    """``sha256:<hex>`` of a weights file: names the exact base an adapter was trained on."""
    h = hashlib.sha256()
    with weights.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def adapter_config(
    r: int, alpha: float, targets: list[str], base: str, base_fingerprint: str, base_config: dict[str, Any]
) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT writes it for a LoRA adapter, plus Capstan's base record."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": base,
        "revision": None,
        "capstan": {"base_fingerprint": base_fingerprint, "base_config": base_config},
    }


def write_adapter(tensors: dict[str, torch.Tensor], config: dict[str, Any], out: Path) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out`` (weights last,
    each atomically), readable by a server running under another uid."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_tmp, w_tmp = out / f".{ADAPTER_CONFIG}.tmp", out / f".{ADAPTER_WEIGHTS}.tmp"
    cfg_tmp.write_text(json.dumps(config, indent=2))
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(w_tmp),
              metadata={"format": "pt"})
    os.chmod(w_tmp, 0o644)
    os.replace(cfg_tmp, out / ADAPTER_CONFIG)
    os.replace(w_tmp, out / ADAPTER_WEIGHTS)
