"""Weight-only int8 quantization of the reference server (serve/quantize.py): error bounds,
memory, what stays in float, devices, and the server answering from the quantized weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import torch
from torch import nn

import capstan_workloads
from capstan.local.workers import free_port
from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.serve.app import Limits
from capstan_workloads.serve.loader import load_model_dir
from capstan_workloads.serve.quantize import Int8Linear, quantize_model, quantize_weight, weight_bytes
from capstan_workloads.serve.testing import make_model_dir, reference_generate, wait_ready


def test_round_trip_error_is_at_most_half_a_step_per_channel() -> None:
    torch.manual_seed(0)
    # rows of very different magnitudes: a per-tensor scale would crush the small ones
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    assert int(q.abs().max()) == 127  # each non-zero row uses the full range
    err = (w - q.float() * scale[:, None]).abs()
    assert bool((err <= scale[:, None] / 2 + 1e-7).all())
    assert bool((q[5] == 0).all()) and float(err[5].max()) == 0.0
    # relative to each row's largest weight, the error is under 1/254
    assert float((err.amax(1) / w.abs().amax(1).clamp_min(1e-12)).max()) <= 1 / 254 + 1e-6


def test_model_weights_shrink_and_embeddings_norms_stay_float() -> None:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg).eval()
    linears = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    channels = sum(m.out_features for m in linears)
    before = weight_bytes(model)
    report = quantize_model(model, "int8")
    assert report.layers == len(linears) == 4 * cfg.n_layer
    # each linear weight: 4 bytes -> 1 byte per element, plus one fp32 scale per output channel
    assert report.bytes_before == before
    assert report.bytes_after == before - 3 * weights + 4 * channels == weight_bytes(model)
    assert not [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    assert model.tok_emb.weight.dtype == torch.float32 and model.blocks[0].ln1.weight.dtype == torch.float32
    assert quantize_model(GPT(cfg), "none").layers == 0
    with pytest.raises(ValueError, match="quantization must be one of none, int8"):
        quantize_model(GPT(cfg), "int4")


def test_quantized_model_tracks_the_float_one() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64)).eval()
    x = torch.randint(0, 50, (4, 32))
    with torch.inference_mode():
        ref, _ = model(x)
        quantize_model(model, "int8")
        out, _ = model(x)
    assert float((out - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_buffers_follow_the_model_to_a_device_and_dtype() -> None:
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    quantize_model(model, "int8")
    model.to(torch.bfloat16)  # only float tensors change dtype: the int8 weights stay int8
    layer = model.blocks[0].attn.qkv
    assert isinstance(layer, Int8Linear)
    assert layer.qweight.dtype == torch.int8 and layer.scale.dtype == torch.bfloat16
    model.to("meta")  # every weight and scale moves with the model (meta: no memory, any machine)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_quantized_bfloat16_model_runs() -> None:
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16)).to(torch.bfloat16)
    quantize_model(model, "int8")
    logits, _ = model(torch.randint(0, 20, (2, 8)))
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())


def test_limits_reject_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="quantization must be one of none, int8, got 'fp8'"):
        Limits(quantization="fp8").validate()


def _env() -> dict[str, str]:
    root = str(Path(capstan_workloads.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.mark.slow
async def test_server_process_with_int8_answers_completions(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m", block_size=64, train_steps=60)
    lm = load_model_dir(model_dir)
    float_bytes = weight_bytes(lm.model)
    prompts = ["the quick brown", "paged attention"]
    quantize_model(lm.model, "int8")
    # greedy continuations of the int8 model by full recomputation: what the server must answer
    expected = [
        lm.tokenizer.decode(reference_generate(lm.model, lm.tokenizer.encode(p), 12, lm.tokenizer.eos_id))
        for p in prompts
    ]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(model_dir), "--host",
         "127.0.0.1", "--port", str(port), "--threads", "1", "--quantization", "int8"],
        env={**_env(), "CAPSTAN_DEVICE": "auto"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with aiohttp.ClientSession() as s:
            ready = await wait_ready(s, url, proc)
            assert ready["quantization"] == "int8"
            assert ready["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
            assert 0 < ready["weightBytes"] < 0.5 * float_bytes
            answers = []
            for prompt in prompts:
                body = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
                async with s.post(f"{url}/v1/completions", json=body) as r:
                    assert r.status == 200, await r.text()
                    answers.append(await r.json())
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert [a["choices"][0]["text"] for a in answers] == expected
    assert all(a["usage"]["completion_tokens"] > 0 for a in answers)
    out = proc.stdout.read() if proc.stdout else ""
    assert "quantization int8: 8 linear layers" in out


def test_lora_adapters_apply_over_int8_layers() -> None:
    """`--quantization int8 --enable-lora`: each adapted row gets the int8 base output plus its delta."""
    from capstan_workloads.serve.adapters import Adapter, AdapterRows, linear_shapes, wrap_linears

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg).eval()
    quantize_model(model, "int8")
    int8_qkv = model.blocks[1].attn.qkv
    rows = AdapterRows()
    assert wrap_linears(model, cfg, rows) == len(linear_shapes(cfg))
    out_f, in_f = linear_shapes(cfg)["blocks.1.attn.qkv"]
    a, b = torch.randn(4, in_f), torch.randn(out_f, 4)
    adapter = Adapter("sql", "/adapters/sql", 4, 0.5, {"blocks.1.attn.qkv": (a, b)})
    x = torch.randn(3, 5, in_f)
    with torch.no_grad(), rows.use([None, adapter, None], torch.device("cpu")):
        y = model.blocks[1].attn.qkv(x)
        base = int8_qkv(x)
    assert isinstance(int8_qkv, Int8Linear)
    assert torch.allclose(y[0], base[0]) and torch.allclose(y[2], base[2])
    assert torch.allclose(y[1], base[1] + 0.5 * (x[1] @ a.T) @ b.T, atol=1e-5)
