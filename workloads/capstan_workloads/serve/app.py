"""Server state and the :func:`create_app` factory used by ``__main__``, the local executor and tests."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from aiohttp import web

from .adapters import AdapterRegistry, AdapterRows, parse_lora_modules, wrap_linears
from .chat import ChatTemplate
from .engine import Engine
from .kvcache import PagedKVCache
from .loader import LoadedModel, load_model_dir
from .metrics import ServingMetrics
from .quantize import MODES as QUANTIZATIONS
from .quantize import QuantizeReport, quantize_model
from .scheduler import Scheduler

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_ENV = "CAPSTAN_DEVICE"  # the --device default: auto, cpu, cuda or cuda:N


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU when torch sees one, else the CPU; ``cpu``/``cuda[:N]`` as asked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for, but torch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
        )
    return torch.device(name)


@dataclass
class Limits:
    """Capacity and behaviour knobs; each is also a CLI flag of ``python -m capstan_workloads.serve``."""

    max_batch_size: int = 32  # sequences decoded together in one forward
    max_waiting: int = 256  # queued requests before answering 429
    kv_blocks: int | None = None  # KV pool size; default: max_batch_size full-length sequences
    kv_block_tokens: int = 16  # tokens per KV block
    max_prefill_tokens: int = 4096  # prompt tokens prefilled per step (the first always fits)
    threads: int | None = None  # torch intra-op threads; default: CPUs available to the process
    dtype: str = "float32"
    drain_seconds: float = 30.0  # SIGTERM grace period for in-flight requests
    retry_after_seconds: int = 1  # Retry-After sent with 429/503
    add_bos: bool = False  # prepend <bos> to every prompt (an empty prompt always gets it)
    model_name: str | None = None  # "model" field of responses; default: the model dir's name
    device: str = "auto"  # auto (CUDA when available), cpu, cuda, cuda:N
    prefix_caching: bool = True  # share KV blocks of identical prompt prefixes across requests
    chat_template: str | None = None  # jinja2 file; default: the model dir's chat_template.jinja or built-in
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    quantization: str = "none"  # none, or int8: weight-only int8 linear layers (serve/quantize.py)
    enable_lora: bool = False  # serve LoRA adapters over the base (also implied by lora_modules)
    lora_modules: tuple[str, ...] = ()  # name=path adapters loaded at start-up (vLLM's --lora-modules)
    max_loras: int = 8  # adapters held at once
    max_lora_rank: int = 64  # largest adapter rank accepted

    def validate(self) -> None:
        """Reject nonsensical limits early with a readable message."""
        for name in ("max_batch_size", "max_waiting", "kv_block_tokens", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError("kv_blocks must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_stop < 0:
            raise ValueError("max_stop must be >= 0")
        if self.quantization not in QUANTIZATIONS:
            modes = ", ".join(QUANTIZATIONS)
            raise ValueError(f"quantization must be one of {modes}, got {self.quantization!r}")
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        modules = parse_lora_modules(self.lora_modules)
        names = [n for n, _ in modules]
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules: duplicate adapter names in {', '.join(names)}")
        if len(modules) > self.max_loras:
            raise ValueError(f"lora_modules: {len(modules)} adapters exceed max_loras {self.max_loras}")


class ServerState:
    """Everything the handlers share: the model once loaded, the scheduler, metrics, drain flag."""

    def __init__(self, model_dir: str | Path, limits: Limits) -> None:
        self.model_dir = Path(model_dir)
        self.limits = limits
        self.model_name = limits.model_name or self.model_dir.resolve().name
        self.metrics = ServingMetrics()
        self.loaded: LoadedModel | None = None
        self.scheduler: Scheduler | None = None
        self.chat_template: ChatTemplate | None = None
        self.device: torch.device | None = None
        self.quantized: QuantizeReport | None = None
        self.adapters: AdapterRegistry | None = None  # with enable_lora / lora_modules, once loaded
        self.load_error: str | None = None
        self.load_task: asyncio.Task[None] | None = None
        self.draining = False
        self.active_requests = 0  # completion handlers in flight (what a drain waits for)
        self.started = time.time()

    @property
    def ready(self) -> bool:
        """Model loaded, engine running and not draining."""
        return self.scheduler is not None and not self.draining

    async def load(self) -> None:
        """Load the model off the event loop, then start the scheduler thread."""
        try:
            self.scheduler = await asyncio.get_running_loop().run_in_executor(None, self._build)
        except Exception as exc:
            self.load_error = str(exc)
            log.error("failed to load model from %s: %s", self.model_dir, exc)
            raise
        self.scheduler.start()
        log.info("model %s loaded; ready", self.model_name)

    def _build(self) -> Scheduler:
        lim = self.limits
        threads = lim.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        device = resolve_device(lim.device)
        loaded = load_model_dir(self.model_dir, DTYPES[lim.dtype])
        # quantized where it was loaded, then moved: int8 weights and scales are buffers, so they
        # land on the server's device with the rest of the model
        self.quantized = quantize_model(loaded.model, lim.quantization)
        loaded.model.to(device)
        if self.quantized.layers:
            q = self.quantized
            log.info("quantization %s: %d linear layers, weights %d -> %d bytes",
                     q.mode, q.layers, q.bytes_before, q.bytes_after)
        self.chat_template = ChatTemplate.load(lim.chat_template, self.model_dir)
        cfg = loaded.config
        per_seq = -(-cfg.block_size // lim.kv_block_tokens)
        num_blocks = lim.kv_blocks or lim.max_batch_size * per_seq
        if num_blocks < per_seq:
            # Otherwise a full-length request could never be admitted and would wait forever.
            raise ValueError(
                f"kv_blocks={num_blocks} cannot hold one {cfg.block_size}-token sequence "
                f"({per_seq} blocks of {lim.kv_block_tokens})"
            )
        cache = PagedKVCache(
            cfg.n_layer,
            cfg.n_embd,
            num_blocks,
            lim.kv_block_tokens,
            DTYPES[lim.dtype],
            device=device,
            prefix_caching=lim.prefix_caching,
        )
        engine = Engine(loaded.model, cache, sample_vocab=loaded.tokenizer.vocab_size)
        if lim.enable_lora or lim.lora_modules:
            self.adapters = self._adapters(engine, device)
        self.loaded = loaded
        self.device = device
        log.info(
            "device %s, %d KV blocks of %d tokens, prefix caching %s",
            device,
            num_blocks,
            lim.kv_block_tokens,
            "on" if lim.prefix_caching else "off",
        )
        return Scheduler(
            engine,
            loaded.tokenizer,
            self.metrics,
            max_batch_size=lim.max_batch_size,
            max_waiting=lim.max_waiting,
            max_prefill_tokens=lim.max_prefill_tokens,
            threads=threads,
        )

    def _adapters(self, engine: Engine, device: torch.device) -> AdapterRegistry:
        """Wrap the model's linears for per-request adapters and load the start-up ones."""
        from capstan_workloads.lora import fingerprint

        lim, cfg = self.limits, engine.cfg
        rows = AdapterRows()
        wrap_linears(engine.model, cfg, rows)
        engine.adapter_rows = rows
        registry = AdapterRegistry(
            cfg,
            self.model_name,
            max_loras=lim.max_loras,
            max_rank=lim.max_lora_rank,
            base_fingerprint=fingerprint(self.model_dir / "model.safetensors"),
            device=device,
            dtype=DTYPES[lim.dtype],
        )
        for name, path in parse_lora_modules(lim.lora_modules):
            registry.load(name, path)  # a bad start-up adapter fails the load, like a bad model
        return registry

    def begin_drain(self) -> None:
        """Stop accepting work: readyz and new completions answer 503 from now on."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.active_requests)
        self.draining = True

    async def drain(self, timeout: float | None = None) -> bool:
        """Begin draining and wait until in-flight requests finish; False if ``timeout`` ran out."""
        self.begin_drain()
        deadline = time.monotonic() + (self.limits.drain_seconds if timeout is None else timeout)
        while self.active_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.active_requests == 0

    async def close(self) -> None:
        """Stop the scheduler (aborting what is left) and wait for handlers to send their answers."""
        if self.load_task is not None and not self.load_task.done():
            self.load_task.cancel()
        if self.scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.stop)
            for _ in range(40):  # aborted handlers need a few loop turns to respond
                if not self.active_requests:
                    break
                await asyncio.sleep(0.05)


STATE = web.AppKey("capstan_serve_state", ServerState)


def create_app(model_dir: str | Path, **limits: Any) -> web.Application:
    """Build the aiohttp application; the model loads in the background once the app starts.

    ``limits`` are the fields of :class:`Limits` (``max_batch_size``, ``max_waiting``, ``kv_blocks``,
    ...). ``/readyz`` answers 503 until loading finishes.
    """
    from .http import add_routes

    known = {f.name for f in fields(Limits)}
    unknown = set(limits) - known
    if unknown:
        raise TypeError(f"unknown limits: {', '.join(sorted(unknown))}")
    lim = Limits(**limits)
    lim.validate()
    app = web.Application()
    state = ServerState(model_dir, lim)
    app[STATE] = state
    add_routes(app)

    async def on_startup(app: web.Application) -> None:
        state.load_task = asyncio.create_task(state.load())
        # Errors are recorded in state.load_error; keep asyncio from warning "never retrieved".
        state.load_task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def on_shutdown(app: web.Application) -> None:
        state.begin_drain()
        await state.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    return app
