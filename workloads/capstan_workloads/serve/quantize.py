"""Weight-only int8 quantization of the server's linear layers (``--quantization int8``).

Every ``nn.Linear`` inside the transformer blocks (attention qkv and output projections, the MLP)
becomes an :class:`Int8Linear`: int8 weights, one symmetric scale per output channel
(``scale = max|w_row| / 127``), the bias kept in the model's float dtype. The matmul runs on the
int8 weights cast to the activations' dtype, and the per-channel scales are applied to its output
(``x @ (q * s)^T == (x @ q^T) * s``), so no float copy of the weights is kept between calls. The
embeddings (whose table is also the tied output head), the layer norms and the KV cache stay in
float: they are small, or sensitive to rounding.

Why not torch's own weight-only int8 kernel (``torch._weight_int8pack_mm``): it is private API, CPU
only on some builds, and on this project's CPU it measured slower than the cast-then-matmul used
here (docs/reference-server.md). Weights and scales are buffers, so ``model.to(device)`` moves them
with the rest of the model, and a later ``model.to(dtype)`` leaves the int8 weights alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: The modes ``--quantization`` accepts ("none" serves the weights as loaded).
MODES = ("none", "int8")
QMAX = 127  # symmetric: -127..127, so -w and w round to the same magnitude


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``(q, scale)`` with ``weight ≈ q * scale[:, None]``.

    The rounding error of each element is at most ``scale / 2`` of its row; an all-zero row gets
    scale 1 (its q is all zeros, so any scale reconstructs it exactly).
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel float scales."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_weight(linear.weight)
        dtype, device = linear.weight.dtype, linear.weight.device
        self.register_buffer("qweight", q.to(device))
        self.register_buffer("scale", scale.to(device=device, dtype=dtype))
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with (for error checks)."""
        return self.qweight.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


@dataclass(frozen=True)
class QuantizeReport:
    """What :func:`quantize_model` did."""

    mode: str
    layers: int  # linear layers quantized
    bytes_before: int  # weight memory (parameters and buffers) before
    bytes_after: int


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def quantize_model(model: nn.Module, mode: str) -> QuantizeReport:
    """Quantize ``model`` in place as ``mode`` asks (``none`` leaves it as it is).

    Only the linear layers inside ``model.blocks`` are replaced; embeddings, norms and the tied
    head stay in float. Raises ValueError for an unknown mode.
    """
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
    before = weight_bytes(model)
    layers = 0
    if mode == "int8":
        blocks = model.get_submodule("blocks")
        targets = [(name, m) for name, m in blocks.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            parent = blocks.get_submodule(parent_name) if parent_name else blocks
            setattr(parent, child, Int8Linear(linear))
            layers += 1
    return QuantizeReport(mode, layers, before, weight_bytes(model))
