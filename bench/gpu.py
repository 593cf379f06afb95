"""GPU check of the workloads' CUDA paths, for a machine with an NVIDIA GPU (run by hand there).

1. Training: ``torchrun --nproc_per_node=1`` of the reference trainer, which picks NCCL (with gloo
   for CPU collectives) when CUDA is available; then the same job resumed from its checkpoint for
   more steps, so a CUDA-written checkpoint is read back. Reported: backend and device the trainer
   logged, steps/s, tokens/s, the last loss, the step it resumed from.
2. Serving: the exported model behind the reference server twice, ``--device cuda`` and
   ``--device cpu``, side by side; the same greedy requests at concurrency 1, 8 and 32 against
   each (completion tokens/s, p50 latency), plus one streamed ``/v1/chat/completions``; whether
   both devices gave the same greedy text.
   Extra server flags for both runs (``--server-flag=--quantization=int8``) check other paths.

Needs only torch, aiohttp and safetensors (the workloads' extras), not the operator's packages.
Results go to ``bench/results/gpu.json`` (or ``--out``) and, with ``--json``, to stdout.

Usage: ``python bench/gpu.py --json [--steps 300] [--server-flag=...]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from _procs import stop_all

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu.json"


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "workloads"), "PYTHONUNBUFFERED": "1"}


def train(ckpt: Path, steps: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run the reference trainer under torchrun with one process; return what it logged."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
        "-m", "capstan_workloads.train", "--steps", str(steps), "--checkpoint-dir", str(ckpt),
        "--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head", str(args.n_head),
        "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--checkpoint-every", "100",
        "--corpus-chars", "2000000", "--log-every", "50", "--metrics-port", "0",
    ]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.train_timeout)
    wall = time.monotonic() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"trainer exited {proc.returncode}:\n{log[-4000:]}")
    losses = [json.loads(line) for line in (ckpt / "losses.jsonl").read_text().splitlines() if line.strip()]
    dev = re.search(r"\b(cuda|cpu)\b", log)
    resumed = re.search(r"resum\w* from step[^0-9]*(\d+)", log, re.IGNORECASE)
    return {
        "wall_s": round(wall, 1),
        "device_logged": dev.group(1) if dev else None,
        "last_step": losses[-1]["step"],
        "last_loss": round(losses[-1]["loss"], 4),
        "first_loss": round(losses[0]["loss"], 4),
        "resumed_from_step": int(resumed.group(1)) if resumed else None,
        "log_tail": log[-1500:],
    }


def server_cmd(model_dir: Path, port: int, device: str, extra: list[str]) -> list[str]:
    """The reference server's command line on ``device``."""
    return [
        sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(model_dir), "--host", "127.0.0.1",
        "--port", str(port), "--device", device, "--max-batch-size", "32", "--log-level", "WARNING", *extra,
    ]


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    """Poll ``/readyz`` until 200; fail if the server exits first."""
    async with aiohttp.ClientSession() as s:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server {url} exited with {proc.returncode}")
            try:
                async with s.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout}s")


PROMPTS = ["the operator", "a gang of workers", "checkpoint", "serving the model", "once upon a time",
           "kubernetes", "nvlink domain", "tensor parallel"]


async def level(url: str, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """``concurrency`` clients, two greedy requests each; completion tokens/s and latencies."""
    reqs = [PROMPTS[i % len(PROMPTS)] + f" {i}" for i in range(concurrency * 2)]
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for i, p in enumerate(reqs):
        queue.put_nowait((i, p))
    texts: dict[int, str] = {}
    lat: list[float] = []
    tokens = 0

    async def client(s: aiohttp.ClientSession) -> None:
        nonlocal tokens
        while not queue.empty():
            i, prompt = queue.get_nowait()
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
            t = time.monotonic()
            async with s.post(f"{url}/v1/completions", json=body) as r:
                doc = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"{url}: {r.status} {doc}")
            lat.append(time.monotonic() - t)
            texts[i] = doc["choices"][0]["text"]
            tokens += doc["usage"]["completion_tokens"]

    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(s) for _ in range(concurrency)))
    wall = time.monotonic() - t0
    return {"tok_s": round(tokens / wall, 1), "p50_s": round(statistics.median(lat), 3),
            "texts": [texts[i] for i in sorted(texts)]}


async def chat(url: str) -> dict[str, Any]:
    """One streamed chat completion: chunks received and the text."""
    body = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
            "max_tokens": 16, "temperature": 0, "stream": True}
    chunks, text = 0, ""
    async with aiohttp.ClientSession() as s, s.post(f"{url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                doc = json.loads(line[6:])
                chunks += 1
                text += doc["choices"][0].get("delta", {}).get("content") or ""
    return {"chunks": chunks, "text": text}


async def serve(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Both devices side by side on the same requests."""
    ports = {"cuda": free_port(), "cpu": free_port()}
    device = {"cuda": args.gpu_device, "cpu": "cpu"}
    procs = {
        d: subprocess.Popen(server_cmd(model_dir, p, device[d], args.server_flag), env=_env())
        for d, p in ports.items()
    }
    urls = {d: f"http://127.0.0.1:{p}" for d, p in ports.items()}
    try:
        await asyncio.gather(*(wait_ready(urls[d], procs[d]) for d in procs))
        for d in procs:  # warm-up: lazy CUDA init, first allocations
            await level(urls[d], 2, 4)
        out: dict[str, Any] = {"server_flags": args.server_flag}
        for c in (1, 8, 32):
            runs = {d: await level(urls[d], c, args.max_tokens) for d in procs}
            same = [a == b for a, b in zip(runs["cuda"]["texts"], runs["cpu"]["texts"], strict=True)]
            out[f"c{c}"] = {
                "cuda_tok_s": runs["cuda"]["tok_s"], "cpu_tok_s": runs["cpu"]["tok_s"],
                "ratio": round(runs["cuda"]["tok_s"] / runs["cpu"]["tok_s"], 2),
                "cuda_p50_s": runs["cuda"]["p50_s"], "cpu_p50_s": runs["cpu"]["p50_s"],
                "same_text": runs["cuda"]["texts"] == runs["cpu"]["texts"],
                "same_text_share": round(sum(same) / len(same), 2),
            }
            print(f"c{c}: {json.dumps(out[f'c{c}'])}", file=sys.stderr, flush=True)
        out["chat_cuda"] = await chat(urls["cuda"])
        return out
    finally:
        stop_all(procs.values())


def main() -> int:
    """Train, resume, serve; print and write the figures."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--train-timeout", type=float, default=240)
    p.add_argument("--server-flag", action="append", default=[], help="extra reference-server flag (repeat)")
    p.add_argument("--out", type=Path, default=RESULTS)
    # cpu: try the script on a machine without a GPU
    p.add_argument("--gpu-device", default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch  # only for the report: the runs below are subprocesses

    result: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        first = train(ckpt, args.steps, args)
        resumed = train(ckpt, args.steps + 100, args)
        result["train"] = {k: v for k, v in first.items() if k != "log_tail"}
        result["train"]["steps_per_s"] = round(args.steps / first["wall_s"], 2)
        result["train"]["tokens_per_s"] = round(args.steps * args.batch_size * args.seq_len / first["wall_s"])
        result["resume"] = {k: v for k, v in resumed.items() if k != "log_tail"}
        print(first["log_tail"], file=sys.stderr)
        print(resumed["log_tail"], file=sys.stderr)
        result["serve"] = asyncio.run(serve(ckpt / "export", args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
