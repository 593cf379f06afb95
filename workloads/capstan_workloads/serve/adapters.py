"""LoRA adapters served over one shared base model, chosen per request by ``model`` name.

The base weights are loaded once and never change. With adapters enabled (``--enable-lora``),
each of the GPT's linear layers (``attn.qkv``, ``attn.proj``, ``mlp.fc``, ``mlp.proj`` of every
block) is wrapped in an :class:`AdapterLinear`, which adds ``scaling * B(A(x))`` to the rows of the
batch whose request picked an adapter that adapts that layer. Rows of different adapters (and of
the base) share one batch: the engine hands the row-to-adapter map to :meth:`AdapterRows.use`
before each forward.

Adapters are read in PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), the format the reference
trainer exports, at start-up (``--lora-modules name=path``) or at run time through vLLM's admin
endpoints ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``
(``{"lora_name": ..., "lora_path": ...}``). Unloading an adapter that requests are still using is
safe: each request holds its own reference, and its KV blocks are hashed under a salt unique to that
load, so a later adapter of the same name never reuses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from aiohttp import web
from safetensors.torch import load_file
from torch import nn

from capstan_workloads.model import GPTConfig

log = logging.getLogger(__name__)

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_loads = itertools.count(1)


class AdapterError(ValueError):
    """An adapter that cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def linear_shapes(cfg: GPTConfig) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every adaptable linear of a GPT with config ``cfg``."""
    e = cfg.n_embd
    per_block = {"attn.qkv": (3 * e, e), "attn.proj": (e, e), "mlp.fc": (4 * e, e), "mlp.proj": (e, 4 * e)}
    return {f"blocks.{i}.{k}": v for i in range(cfg.n_layer) for k, v in per_block.items()}


@dataclass(eq=False)
class Adapter:
    """A loaded adapter: per module, ``A`` (r x in) and ``B`` (out x r) on the server's device."""

    name: str
    path: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    salt: bytes = field(default_factory=lambda: f"lora-load-{next(_loads)}".encode())

    @property
    def modules(self) -> list[str]:
        """Adapted module names."""
        return sorted(self.weights)


def read_adapter(
    name: str,
    path: str | Path,
    cfg: GPTConfig,
    *,
    max_rank: int,
    base_fingerprint: str | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Adapter:
    """Read and check a PEFT LoRA adapter directory against the base; :class:`AdapterError` says why not."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"adapter {name!r}: {root} is not a directory", 404)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (root / f).is_file()]
    if missing:
        raise AdapterError(f"adapter {name!r}: {root} has no {', '.join(missing)}", 404)
    try:
        config = json.loads((root / ADAPTER_CONFIG).read_text())
    except ValueError as exc:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_CONFIG} is not JSON: {exc}") from exc
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type is {config.get('peft_type')!r}, only LORA is served")
    rank, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"adapter {name!r}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {rank} exceeds --max-lora-rank {max_rank}")
    if not isinstance(alpha, int | float) or alpha <= 0:
        raise AdapterError(f"adapter {name!r}: lora_alpha must be a positive number, got {alpha!r}")
    if config.get("use_dora"):
        raise AdapterError(f"adapter {name!r}: DoRA adapters are not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias {config['bias']!r} is not supported (only none)")
    trained_on = (config.get("capstan") or {}).get("base_fingerprint")
    if trained_on and base_fingerprint and trained_on != base_fingerprint:
        raise AdapterError(f"adapter {name!r} was trained on base {trained_on}, but this server serves "
                           f"{base_fingerprint}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    shapes = linear_shapes(cfg)
    tensors = load_file(str(root / ADAPTER_WEIGHTS))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        short = key.removeprefix(PEFT_PREFIX).replace(".default.", ".")
        module, _, kind = short.rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or module not in shapes:
            known = ", ".join(sorted({".".join(m.split(".")[-2:]) for m in shapes}))
            raise AdapterError(f"adapter {name!r}: tensor {key} is not a LoRA weight of a layer of this base "
                               f"(adaptable: {known} of blocks 0-{cfg.n_layer - 1})")
        parts.setdefault(module, {})[kind[0]] = value
    if not parts:
        raise AdapterError(f"adapter {name!r}: {ADAPTER_WEIGHTS} holds no LoRA weights")
    weights = {}
    for module, ab in sorted(parts.items()):
        out_f, in_f = shapes[module]
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None:
            raise AdapterError(f"adapter {name!r}: {module} has lora_{'B' if a is not None else 'A'} only")
        if tuple(a.shape) != (rank, in_f) or tuple(b.shape) != (out_f, rank):
            raise AdapterError(f"adapter {name!r}: {module} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}; rank {rank} on this base needs {(rank, in_f)} and "
                               f"{(out_f, rank)}")
        weights[module] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
    return Adapter(name, str(root), rank, float(scaling), weights)


class AdapterRows:
    """Which adapter each row of the current forward uses; set by the engine, read by the layers."""

    def __init__(self) -> None:
        self.groups: list[tuple[Adapter, torch.Tensor]] = []

    @contextlib.contextmanager
    def use(self, rows: list[Adapter | None] | None, device: torch.device) -> Iterator[None]:
        """During the block: row ``i`` of every adapted layer's input gets ``rows[i]`` (None: the base)."""
        groups: dict[int, tuple[Adapter, list[int]]] = {}
        for i, adapter in enumerate(rows or ()):
            if adapter is not None:
                groups.setdefault(id(adapter), (adapter, []))[1].append(i)
        self.groups = [(a, torch.tensor(idx, dtype=torch.long, device=device)) for a, idx in groups.values()]
        try:
            yield
        finally:
            self.groups = []


class AdapterLinear(nn.Module):
    """A base linear layer plus the LoRA deltas of whichever adapters the current rows use."""

    def __init__(self, base: nn.Module, name: str, rows: AdapterRows) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for adapter, idx in self.rows.groups:
            ab = adapter.weights.get(self.name)
            if ab is None:
                continue
            a, b = ab
            xs = x.index_select(0, idx)
            y = y.index_add(0, idx, (xs @ a.T) @ b.T, alpha=adapter.scaling)
        return y


def wrap_linears(model: nn.Module, cfg: GPTConfig, rows: AdapterRows) -> int:
    """Wrap every adaptable linear of ``model`` (the base weights stay shared); return how many."""
    for name in linear_shapes(cfg):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, AdapterLinear(getattr(parent, attr), name, rows))
    return len(linear_shapes(cfg))


class AdapterRegistry:
    """The adapters a server holds, by name. Loads run off the event loop; reads are lock-free."""

    def __init__(
        self,
        cfg: GPTConfig,
        base_name: str,
        *,
        max_loras: int,
        max_rank: int,
        base_fingerprint: str | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.cfg, self.base_name = cfg, base_name
        self.max_loras, self.max_rank = max_loras, max_rank
        self.base_fingerprint = base_fingerprint
        self.device, self.dtype = device, dtype
        self._adapters: dict[str, Adapter] = {}
        self._lock = threading.Lock()  # load/unload from several handlers at once

    def get(self, name: str) -> Adapter | None:
        """The adapter served under ``name``, or None."""
        return self._adapters.get(name)

    def all(self) -> list[Adapter]:
        """Loaded adapters, by name."""
        return [self._adapters[n] for n in sorted(self._adapters)]

    def load(self, name: str, path: str) -> Adapter:
        """Read ``path`` and serve it as ``name``; :class:`AdapterError` when it cannot be."""
        if not name:
            raise AdapterError("lora_name must be a non-empty string")
        if name == self.base_name:
            raise AdapterError(f"lora_name {name!r} is the base model's served name")
        with self._lock:
            if name in self._adapters:
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
            if len(self._adapters) >= self.max_loras:
                raise AdapterError(f"already serving --max-loras {self.max_loras} adapters; unload one first")
        adapter = read_adapter(name, path, self.cfg, max_rank=self.max_rank,
                               base_fingerprint=self.base_fingerprint, device=self.device, dtype=self.dtype)
        with self._lock:
            if name in self._adapters:  # a concurrent load of the same name won
                raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
            self._adapters = {**self._adapters, name: adapter}
        log.info("loaded LoRA adapter %s (rank %d, %d layers) from %s", name, adapter.rank,
                 len(adapter.weights), path)
        return adapter

    def unload(self, name: str) -> None:
        """Stop serving ``name`` (requests already running finish with it)."""
        with self._lock:
            if name not in self._adapters:
                raise AdapterError(f"The lora adapter '{name}' cannot be found.", 404)
            self._adapters = {k: v for k, v in self._adapters.items() if k != name}
        log.info("unloaded LoRA adapter %s", name)


def parse_lora_modules(specs: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """``name=path`` pairs (vLLM's ``--lora-modules``; its JSON form ``{"name": .., "path": ..}`` too)."""
    out = []
    for spec in specs:
        if spec.lstrip().startswith("{"):
            data = json.loads(spec)
            name, path = data.get("name"), data.get("path")
        else:
            name, sep, path = spec.partition("=")
            if not sep:
                name = path = None
        if not name or not path:
            raise ValueError(f"--lora-modules {spec!r}: expected name=path")
        out.append((str(name), str(path)))
    return out


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    kind = "NotFoundError" if status == 404 else "BadRequestError"
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": status}},
                             status=status)


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "request body must be valid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or not body["lora_name"]:
        return _error(400, "lora_name must be a non-empty string", "lora_name")
    return body


def add_adapter_routes(app: web.Application, registry: Callable[[], AdapterRegistry | None]) -> None:
    """``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's admin API).

    ``registry``: returns the :class:`AdapterRegistry`, or None while the model loads or when the
    server runs without ``--enable-lora``.
    """

    async def load(request: web.Request) -> web.StreamResponse:
        reg: AdapterRegistry | None = registry()
        if reg is None:
            return _error(400, "LoRA is not enabled on this server (start it with --enable-lora) or the "
                          "model is still loading")
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        path = body.get("lora_path")
        if not isinstance(path, str) or not path:
            return _error(400, "lora_path must be a non-empty string", "lora_path")
        try:
            await asyncio.get_running_loop().run_in_executor(None, reg.load, body["lora_name"], path)
        except AdapterError as exc:
            return _error(exc.status, str(exc), "lora_path" if exc.status == 404 else "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

    async def unload(request: web.Request) -> web.StreamResponse:
        reg: AdapterRegistry | None = registry()
        if reg is None:
            return _error(400, "LoRA is not enabled on this server (start it with --enable-lora)")
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        try:
            reg.unload(body["lora_name"])
        except AdapterError as exc:
            return _error(exc.status, str(exc), "lora_name")
        return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)
