"""Build small exported model dirs for tests and benchmarks, without depending on the trainer."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import torch
import torch.nn.functional as F

from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.tokenizer import Tokenizer

from .loader import export_model_dir

CORPUS = (
    "the quick brown fox jumps over the lazy dog. "
    "a capstan is a rotating machine used on sailing ships to apply force to ropes. "
    "continuous batching admits new requests into the running batch at every step. "
    "paged attention keeps the kv cache in fixed size blocks. "
) * 4


def make_model_dir(
    model_dir: str | Path,
    *,
    block_size: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    train_steps: int = 60,
    seed: int = 0,
) -> Path:
    """Export a GPT trained for ``train_steps`` quick steps on a fixed corpus (0 = random init).

    A few steps are enough to make greedy continuations varied text instead of one repeated
    character, which makes batching bugs visible in tests.
    """
    torch.manual_seed(seed)
    tok = Tokenizer.build([CORPUS])
    model = GPT(
        GPTConfig(
            vocab_size=tok.vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd
        )
    )
    if train_steps:
        data = torch.tensor(tok.encode(CORPUS))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        span = min(block_size, 48)
        for _ in range(train_steps):
            starts = torch.randint(0, len(data) - span - 1, (16,))
            x = torch.stack([data[s : s + span] for s in starts])
            y = torch.stack([data[s + 1 : s + span + 1] for s in starts])
            logits, _ = model(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return export_model_dir(model, tok, model_dir)


@torch.inference_mode()
def reference_generate(model: GPT, prompt: list[int], max_tokens: int, eos_id: int) -> list[int]:
    """Greedy generation by full recomputation with ``GPT.forward`` (no cache): the ground truth."""
    ids = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens and len(ids) < model.cfg.block_size:
        logits, _ = model(torch.tensor([ids]))
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        ids.append(tok)
        if tok == eos_id:
            break
    return out


async def wait_ready(
    session: aiohttp.ClientSession,
    url: str,
    proc: subprocess.Popen[str] | None = None,
    timeout_s: float = 30.0,
    interval_s: float = 0.1,
) -> dict[str, Any]:
    """Poll ``url``/readyz until the server answers 200; its JSON. AssertionError when it does not
    within ``timeout_s``, or when ``proc`` (the server's process) exits first (with its output)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            async with session.get(f"{url}/readyz") as r:
                if r.status == 200:
                    answer: dict[str, Any] = await r.json()
                    return answer
        except aiohttp.ClientConnectionError:
            pass
        if proc is not None and proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"server exited {proc.returncode}: {output}")
        await asyncio.sleep(interval_s)
    raise AssertionError(f"server at {url} never became ready within {timeout_s:.0f} s")


@asynccontextmanager
async def serving(
    model_dir: str | Path, wait: bool = True, **limits: Any
) -> AsyncIterator[tuple[str, Any]]:
    """The reference server in this process (``create_app``, one thread) on an ephemeral
    127.0.0.1 port: its base URL and :class:`~capstan_workloads.serve.app.ServerState`, once ready
    (unless ``wait`` is False)."""
    from aiohttp import web

    from .app import STATE, create_app  # the app imports the engine; model-dir helpers need none of it

    app = create_app(Path(model_dir), threads=1, **limits)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    try:
        if wait:
            async with aiohttp.ClientSession() as s:
                await wait_ready(s, url, timeout_s=4.0, interval_s=0.02)
        yield url, app[STATE]
    finally:
        await runner.cleanup()
