"""Quantized serving yardstick: the reference server with ``--quantization int8`` against the same
model unquantized, side by side in one run.

1. Train a GPT for ``--steps`` on the trainer's generated corpus (seed 1) and export it.
2. Weight memory: bytes of parameters and buffers (each storage once) of the loaded model, float
   and int8, and of the linear layers alone (the part int8 shrinks).
3. Held-out loss: mean cross-entropy (and perplexity) of both models over non-overlapping
   ``block_size`` windows of a corpus generated with another seed (text never trained on).
4. Tokens/s: two server processes side by side (same model dir, same threads, one with
   ``--quantization int8``); at each concurrency level, ``--reps`` alternating runs of the same
   greedy fixed-length requests (``ignore_eos``); medians reported, with the share of requests
   whose greedy text is the same under both.
5. Kernel: one linear layer of the model's MLP shape at decode batch sizes: float ``F.linear``,
   the server's int8 layer (cast, matmul, per-channel scale), and torch's private
   ``torch._weight_int8pack_mm``, median microseconds per call (why the server casts).

Results go to ``bench/results/quantization.json``.

Usage: ``python bench/quantization.py [--json] [--steps 300] [--levels 1,8] [--reps 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "workloads"), str(ROOT / "operator")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _procs import stop_all  # noqa: E402  (bench/ is the script's own folder)
from capstan.local.workers import free_port  # noqa: E402
from capstan_workloads.data import generate_corpus  # noqa: E402
from capstan_workloads.model import GPT, GPTConfig  # noqa: E402
from capstan_workloads.serve.loader import export_model_dir, load_model_dir  # noqa: E402
from capstan_workloads.serve.quantize import Int8Linear, quantize_model, weight_bytes  # noqa: E402
from capstan_workloads.tokenizer import Tokenizer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "quantization.json"


def _serving_bench() -> Any:
    """bench/serving.py as a module: its HTTP client loop and readiness wait."""
    spec = importlib.util.spec_from_file_location("capstan_bench_serving", ROOT / "bench" / "serving.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_model(args: argparse.Namespace, out: Path) -> tuple[Path, str, Tokenizer]:
    """Train on the generated corpus; return the model dir, the held-out text and the tokenizer."""
    torch.manual_seed(0)
    train_text = generate_corpus(args.train_chars, seed=1)
    heldout_text = generate_corpus(args.heldout_chars, seed=2)
    tok = Tokenizer.build([train_text, heldout_text])  # the vocabulary only (the same characters)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(cfg)
    data = torch.tensor(tok.encode(train_text))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    span = args.block_size
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - span - 1, (args.batch_size,))
        x = torch.stack([data[s : s + span] for s in starts])
        y = torch.stack([data[s + 1 : s + span + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad()
        assert loss is not None
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"train step {step + 1}/{args.steps}: loss {loss.item():.4f}", file=sys.stderr, flush=True)
    model.eval()
    return export_model_dir(model, tok, out), heldout_text, tok


@torch.inference_mode()
def heldout_loss(model: GPT, tokens: torch.Tensor, block: int, windows: int) -> float:
    """Mean next-token cross-entropy over up to ``windows`` non-overlapping windows."""
    n = min(windows, (len(tokens) - 1) // block)
    x = tokens[: n * block].view(n, block)
    y = tokens[1 : n * block + 1].view(n, block)
    losses = []
    for i in range(0, n, 16):
        logits, _ = model(x[i : i + 16])
        losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y[i : i + 16].reshape(-1),
                                      reduction="sum"))
    return float(torch.stack(losses).sum()) / (n * block)


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of the transformer blocks' linear layers (float weights, or int8 weights plus scales)."""
    total = 0
    for m in model.get_submodule("blocks").modules():
        if isinstance(m, torch.nn.Linear | Int8Linear):
            total += sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    return total


def kernel_times(n_embd: int, threads: int, reps: int) -> dict[str, Any]:
    """Median microseconds per call of one MLP-shaped linear layer, three ways, at decode batches."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    linear = torch.nn.Linear(n_embd, 4 * n_embd)
    int8 = Int8Linear(linear)
    out: dict[str, Any] = {}
    for batch in (1, 8, 32):
        x = torch.randn(batch, n_embd)
        ways = {
            "float": lambda x=x: F.linear(x, linear.weight, linear.bias),
            "int8_cast": lambda x=x: int8(x),
            "int8pack_mm": lambda x=x: torch._weight_int8pack_mm(x, int8.qweight, int8.scale) + int8.bias,
        }
        row: dict[str, float | str] = {}
        for name, fn in ways.items():
            try:
                with torch.inference_mode():
                    fn()
                    samples = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        for _ in range(20):
                            fn()
                        samples.append((time.perf_counter() - t0) / 20 * 1e6)
                row[f"{name}_us"] = round(statistics.median(samples), 1)
            except (RuntimeError, NotImplementedError) as exc:  # not on this build or device
                row[f"{name}_us"] = f"unavailable: {str(exc)[:80]}"
        out[f"batch{batch}"] = row
    return out


def make_requests(text: str, n: int, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """``n`` prompts of 16-64 characters cut from ``text``, each asking for exactly ``max_tokens``."""
    rng = random.Random(seed)
    reqs = []
    for _ in range(n):
        length = rng.randint(16, 64)
        start = rng.randint(0, len(text) - length)
        reqs.append({"prompt": text[start : start + length], "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True})
    return reqs


def server_cmd(model_dir: Path, port: int, args: argparse.Namespace, *extra: str) -> list[str]:
    """The reference server's command line, as this benchmark starts it."""
    return [sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(model_dir), "--host",
            "127.0.0.1", "--port", str(port), "--max-batch-size", str(max(args.levels)), "--threads",
            str(args.threads), "--device", "cpu", "--log-level", "WARNING", *extra]


async def throughput(args: argparse.Namespace, model_dir: Path, text: str) -> dict[str, Any]:
    """Tokens/s of the float and the int8 server side by side, medians of alternating runs."""
    sb = _serving_bench()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workloads")}
    fport, qport = free_port(), free_port()
    procs = {
        "float": subprocess.Popen(server_cmd(model_dir, fport, args), env=env),
        "int8": subprocess.Popen(server_cmd(model_dir, qport, args, "--quantization", "int8"), env=env),
    }
    urls = {"float": f"http://127.0.0.1:{fport}", "int8": f"http://127.0.0.1:{qport}"}
    try:
        await asyncio.gather(*(sb.wait_ready(urls[k], procs[k]) for k in procs))
        warm = make_requests(text, 4, 8, seed=99)
        for url in urls.values():
            await sb.run_level(url, warm, 4)
        result: dict[str, Any] = {}
        for c in args.levels:
            reqs = make_requests(text, max(c * args.rounds, args.min_requests), args.max_tokens, seed=c)
            runs: dict[str, list[dict[str, Any]]] = {"float": [], "int8": []}
            for _ in range(args.reps):
                for key in ("float", "int8"):  # alternate: load on a shared machine hits both alike
                    runs[key].append(await sb.run_level(urls[key], reqs, c))
            f_tok = statistics.median(r["tok_s"] for r in runs["float"])
            q_tok = statistics.median(r["tok_s"] for r in runs["int8"])
            pairs = zip(runs["float"][0]["texts"], runs["int8"][0]["texts"], strict=True)
            same = sum(a == b for a, b in pairs)
            result[f"c{c}"] = {
                "float_tok_s": round(f_tok, 1),
                "int8_tok_s": round(q_tok, 1),
                "int8_over_float": round(q_tok / f_tok, 3),
                "float_p50_s": round(statistics.median(r["p50_s"] for r in runs["float"]), 3),
                "int8_p50_s": round(statistics.median(r["p50_s"] for r in runs["int8"]), 3),
                "float_tok_s_runs": [round(r["tok_s"], 1) for r in runs["float"]],
                "int8_tok_s_runs": [round(r["tok_s"], 1) for r in runs["int8"]],
                "requests": len(reqs),
                "same_greedy_text": f"{same}/{len(reqs)}",
            }
            print(f"c{c}: {json.dumps(result[f'c{c}'])}", file=sys.stderr, flush=True)
        return result
    finally:
        stop_all(procs.values())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--json", action="store_true", help="print the result as one JSON line at the end")
    a("--steps", type=int, default=300, help="training steps of the model measured")
    a("--batch-size", type=int, default=16)
    a("--lr", type=float, default=3e-3)
    a("--train-chars", type=int, default=400_000)
    a("--heldout-chars", type=int, default=100_000)
    a("--heldout-windows", type=int, default=128, help="block_size windows of held-out text scored")
    a("--n-layer", type=int, default=4)
    a("--n-embd", type=int, default=256)
    a("--n-head", type=int, default=8)
    a("--block-size", type=int, default=128)
    a("--levels", default="1,8", help="comma-separated client concurrency levels")
    a("--rounds", type=int, default=2, help="requests per client at each level")
    a("--min-requests", type=int, default=4)
    a("--reps", type=int, default=5, help="alternating runs per server and level (median kept)")
    a("--max-tokens", type=int, default=64, help="completion tokens per request")
    a("--threads", type=int, default=1, help="torch threads per server")
    args = p.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="capstan-quant-bench-"))
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    try:
        model_dir, heldout_text, tok = train_model(args, tmp / "model")
        heldout = torch.tensor(tok.encode(heldout_text))
        torch.set_num_threads(max(1, args.threads))
        plain = load_model_dir(model_dir).model
        quant = load_model_dir(model_dir).model
        report = quantize_model(quant, "int8")
        scored = args.block_size * min(args.heldout_windows, (len(heldout) - 1) // args.block_size)
        f_loss = heldout_loss(plain, heldout, args.block_size, args.heldout_windows)
        q_loss = heldout_loss(quant, heldout, args.block_size, args.heldout_windows)
        memory = {
            "float_bytes": weight_bytes(plain),
            "int8_bytes": weight_bytes(quant),
            "int8_over_float": round(weight_bytes(quant) / weight_bytes(plain), 3),
            "float_linear_bytes": linear_bytes(plain),
            "int8_linear_bytes": linear_bytes(quant),
            "linear_int8_over_float": round(linear_bytes(quant) / linear_bytes(plain), 3),
            "quantized_layers": report.layers,
        }
        loss = {
            "float": round(f_loss, 4),
            "int8": round(q_loss, 4),
            "float_perplexity": round(math.exp(f_loss), 4),
            "int8_perplexity": round(math.exp(q_loss), 4),
            "int8_minus_float": round(q_loss - f_loss, 6),
            "tokens_scored": scored,
        }
        print(f"memory {json.dumps(memory)}\nheld-out loss {json.dumps(loss)}", file=sys.stderr, flush=True)
        kernel = kernel_times(args.n_embd, args.threads, args.reps)
        print(f"kernel {json.dumps(kernel)}", file=sys.stderr, flush=True)
        serving = asyncio.run(throughput(args, model_dir, heldout_text))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {
        "serving": serving,
        "weight_memory": memory,
        "heldout_loss": loss,
        "kernel_linear": kernel,
        "model": {"params": plain.num_params(), "n_layer": args.n_layer, "n_embd": args.n_embd,
                  "n_head": args.n_head, "block_size": args.block_size, "train_steps": args.steps},
        "setup": {
            "device": "cpu",
            "threads_per_server": args.threads,
            "reps": args.reps,
            "max_tokens": args.max_tokens,
            "cpus": os.cpu_count(),
            "load_avg_before": round(load_before, 2),
            "load_avg_after": round(os.getloadavg()[0], 2),
            "elapsed_s": round(time.monotonic() - t0, 1),
            "torch": torch.__version__,
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
