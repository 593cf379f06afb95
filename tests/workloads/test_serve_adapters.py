"""LoRA adapters in the reference server: base + adapters in one batch, picked by model name, loaded
and unloaded at run time, against merged-weight ground truth; and the server as a real process."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import torch
from safetensors.torch import load_file

import capstan_workloads
from capstan.local.workers import free_port
from capstan_workloads.lora import (
    LoRALinear,
    adapter_config,
    adapter_tensors,
    apply_lora,
    fingerprint,
    merged_tensors,
    write_adapter,
)
from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.serve.adapters import AdapterError, read_adapter
from capstan_workloads.serve.testing import make_model_dir, reference_generate, wait_ready
from capstan_workloads.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
PROMPTS = ["the quick", "a capstan is", "paged attention", "x"]


def make_adapter(out: Path, base: Path, seed: int, targets: list[str], rank: int = 4) -> GPT:
    """A PEFT adapter over ``base`` with random (non-zero) B; returns the merged model it amounts to."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_file(base / "config.json"))
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    apply_lora(model, targets, rank, 2.0 * rank)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.3)
    state = model.state_dict()
    config = adapter_config(rank, 2.0 * rank, targets, str(base), fingerprint(base / "model.safetensors"),
                            json.loads(model.cfg.to_json()))
    write_adapter(adapter_tensors(state), config, out)
    merged = GPT(model.cfg)
    merged.load_state_dict(merged_tensors(state, 2.0))
    return merged.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("lora-serve")
    base = make_model_dir(root / "base", block_size=64, train_steps=40)
    merged_a = make_adapter(root / "adapter-a", base, 1, ["qkv", "attn.proj"])
    merged_b = make_adapter(root / "adapter-b", base, 2, ["fc", "mlp.proj"], rank=8)
    base_model = GPT(GPTConfig.from_file(base / "config.json"))
    base_model.load_state_dict(load_file(str(base / "model.safetensors")))
    return {"root": root, "base": base, "tok": Tokenizer.load(base / "tokenizer.json"),
            "refs": {"base": base_model.eval(), "a": merged_a, "b": merged_b}}


def expected(models: dict[str, Any], which: str, prompt: str, max_tokens: int = 12) -> str:
    tok = models["tok"]
    ids = reference_generate(models["refs"][which], tok.encode(prompt), max_tokens, tok.eos_id)
    return str(tok.decode(ids))


def _env() -> dict[str, str]:
    root = str(Path(capstan_workloads.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


async def post(s: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with s.post(url + path, json=body) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


async def test_server_process_serves_base_and_two_adapters_and_loads_them_at_run_time(
    models: dict[str, Any],
) -> None:
    root, base = models["root"], models["base"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(base), "--host", "127.0.0.1",
         "--port", str(port), "--model-name", "base", "--device", "cpu", "--threads", "1",
         "--lora-modules", f"a={root / 'adapter-a'}", "--max-lora-rank", "8"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, url, proc)

            async def models_listed() -> dict[str, str | None]:
                async with s.get(f"{url}/v1/models") as r:
                    return {m["id"]: m["parent"] for m in (await r.json())["data"]}

            assert await models_listed() == {"base": None, "a": "base"}

            async def completion(model: str | None, prompt: str) -> tuple[int, Any]:
                body: dict[str, Any] = {"prompt": prompt, "max_tokens": 12, "temperature": 0}
                if model is not None:
                    body["model"] = model
                return await post(s, url, "/v1/completions", body)

            # The adapter loaded at start-up, then one loaded at run time, without a restart.
            status, text = await post(s, url, "/v1/load_lora_adapter",
                                      {"lora_name": "b", "lora_path": str(root / "adapter-b")})
            assert (status, text) == (200, "Success: LoRA adapter 'b' added successfully."), text
            assert await models_listed() == {"base": None, "a": "base", "b": "base"}

            # Base and both adapters in flight at once (one batch): each gets its own weights.
            calls = [(m, p) for p in PROMPTS for m in (None, "base", "a", "b")]
            answers = await asyncio.gather(*(completion(m, p) for m, p in calls))
            outputs: dict[str, set[str]] = {}
            for (m, p), (status, body) in zip(calls, answers, strict=True):
                assert status == 200, body
                which = m or "base"
                assert body["model"] == which
                assert body["choices"][0]["text"] == expected(models, which, p), (which, p)
                outputs.setdefault(which, set()).add(body["choices"][0]["text"])
            assert len({frozenset(v) for v in outputs.values()}) == 3, "adapters did not change the output"

            # Unknown model names: a 404 in OpenAI's shape.
            status, body = await completion("c", "the")
            assert status == 404
            assert body["error"] == {"message": "The model `c` does not exist.", "type": "NotFoundError",
                                     "param": "model", "code": 404}

            # Bad loads are refused with the reason; the adapters served are unchanged.
            for req, want_status, want in [
                ({"lora_name": "a", "lora_path": str(root / "adapter-b")}, 400, "already been loaded"),
                ({"lora_name": "base", "lora_path": str(root / "adapter-b")}, 400,
                 "base model's served name"),
                ({"lora_name": "c", "lora_path": str(root / "nowhere")}, 404, "is not a directory"),
                ({"lora_name": "c"}, 400, "lora_path must be a non-empty string"),
            ]:
                status, body = await post(s, url, "/v1/load_lora_adapter", req)
                assert status == want_status and want in body["error"]["message"], body

            # Unload: requests for it now 404, the others are untouched.
            status, text = await post(s, url, "/v1/unload_lora_adapter", {"lora_name": "a"})
            assert (status, text) == (200, "Success: LoRA adapter 'a' removed successfully.")
            assert (await completion("a", "the"))[0] == 404
            status, body = await completion("b", PROMPTS[0])
            assert status == 200 and body["choices"][0]["text"] == expected(models, "b", PROMPTS[0])
            status, body = await post(s, url, "/v1/unload_lora_adapter", {"lora_name": "a"})
            assert status == 404 and "cannot be found" in body["error"]["message"]
            assert await models_listed() == {"base": None, "b": "base"}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "loaded LoRA adapter a (rank 4, 4 layers)" in out


async def test_adapter_and_its_prefix_cache_are_separate_from_the_base(models: dict[str, Any]) -> None:
    # The same long prompt through the base, then the adapter: a KV block the base computed must not
    # be reused for the adapter (its K/V differ), so the adapter's answer matches its own reference.
    from capstan_workloads.serve.testing import serving

    prompt = "the quick brown fox jumps over the lazy dog. a capstan is"
    lora = (f"a={models['root'] / 'adapter-a'}",)
    async with serving(models["base"], kv_block_tokens=8, lora_modules=lora, model_name="base",
                       device="cpu") as (url, state):
        async with aiohttp.ClientSession() as s:
            for model in ("base", "a", "a", "base"):
                body = {"model": model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
                status, body = await post(s, url, "/v1/completions", body)
                assert status == 200, body
                assert body["choices"][0]["text"] == expected(models, model, prompt, 6), model
        assert state.metrics.prefix_cache_hit_tokens._value.get() > 0  # the repeats did hit


def test_adapters_that_do_not_fit_the_base_are_refused(models: dict[str, Any], tmp_path: Path) -> None:
    cfg = GPTConfig.from_file(models["base"] / "config.json")
    fp = fingerprint(models["base"] / "model.safetensors")
    kw: dict[str, Any] = {"max_rank": 64, "base_fingerprint": fp, "device": torch.device("cpu"),
                          "dtype": torch.float32}
    good = models["root"] / "adapter-a"
    assert read_adapter("a", good, cfg, **kw).modules == ["blocks.0.attn.proj", "blocks.0.attn.qkv",
                                                          "blocks.1.attn.proj", "blocks.1.attn.qkv"]
    with pytest.raises(AdapterError, match="rank 4 exceeds --max-lora-rank 2"):
        read_adapter("a", good, cfg, **(kw | {"max_rank": 2}))
    with pytest.raises(AdapterError, match=r"was trained on base sha256:.*but this server serves sha256:0"):
        read_adapter("a", good, cfg, **(kw | {"base_fingerprint": "sha256:0"}))
    # An adapter of a wider model: shapes do not fit this base.
    wide = tmp_path / "wide"
    wide_model = GPT(GPTConfig(vocab_size=cfg.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=128))
    apply_lora(wide_model, ["qkv"], 4, 8)
    write_adapter(adapter_tensors(wide_model.state_dict()),
                  adapter_config(4, 8, ["qkv"], "wide", "", {}), wide)
    with pytest.raises(AdapterError, match=r"blocks.0.attn.qkv has lora_A \(4, 128\).*needs \(4, 64\)"):
        read_adapter("w", wide, cfg, **kw)
    # A layer the base does not have.
    deep = tmp_path / "deep"
    write_adapter({"base_model.model.blocks.7.attn.qkv.lora_A.weight": torch.zeros(4, 64),
                   "base_model.model.blocks.7.attn.qkv.lora_B.weight": torch.zeros(192, 4)},
                  adapter_config(4, 8, ["qkv"], "deep", "", {}), deep)
    with pytest.raises(AdapterError, match=r"blocks\.7\.attn\.qkv\.lora_A\.weight is not a LoRA weight"):
        read_adapter("d", deep, cfg, **kw)


def test_bad_startup_adapter_fails_the_server_with_the_reason(models: dict[str, Any], tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(models["base"]), "--host",
         "127.0.0.1", "--port", str(free_port()), "--lora-modules", f"a={tmp_path}"],
        env=_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert f"adapter 'a': {tmp_path} has no adapter_config.json, adapter_model.safetensors" in proc.stderr
