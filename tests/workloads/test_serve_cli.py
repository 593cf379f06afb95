"""``python -m capstan_workloads.serve`` as the local executor starts it: a subprocess, SIGTERM drains."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import capstan_workloads
from capstan.local.workers import free_port
from capstan_workloads.serve.testing import make_model_dir, wait_ready

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    # The subprocess must import the same capstan_workloads as this test, installed or not.
    root = str(Path(capstan_workloads.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def test_missing_model_dir_exits_1_with_reason(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "capstan_workloads.serve",
            "--model-dir",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "missing model.safetensors" in proc.stderr


async def test_sigterm_drains_in_flight_then_exits_0(tmp_path: Path) -> None:
    # Big enough (random init) that a 200-token request is still running when SIGTERM lands.
    model_dir = make_model_dir(tmp_path / "m", block_size=256, n_layer=4, n_embd=256, n_head=8, train_steps=0)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "capstan_workloads.serve",
            "--model-dir",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--drain-seconds",
            "20",
        ],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        async with aiohttp.ClientSession() as s:
            await wait_ready(s, url, proc)
            body = {"prompt": "a", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
            inflight = asyncio.create_task(s.post(f"{url}/v1/completions", json=body))
            for _ in range(200):  # wait until the request is really in the running batch
                async with s.get(f"{url}/metrics") as r:
                    if "capstan_serving_requests_running 1.0" in await r.text():
                        break
                await asyncio.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            async with s.get(f"{url}/readyz") as r:
                assert r.status == 503
            async with s.post(f"{url}/v1/completions", json={"prompt": "b", "max_tokens": 3}) as r:
                assert r.status == 503
            resp = await inflight
            assert resp.status == 200
            assert (await resp.json())["usage"]["completion_tokens"] == 200
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    assert "drain complete" in out


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the message of a machine without a CUDA GPU"
)
def test_device_cuda_without_a_gpu_exits_1_naming_the_device(tmp_path: Path) -> None:
    model_dir = make_model_dir(tmp_path / "m", train_steps=0)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "capstan_workloads.serve",
            "--model-dir",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        env={**_env(), "CAPSTAN_DEVICE": "cuda"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "device 'cuda' asked for, but torch sees no CUDA GPU" in proc.stderr


async def test_chat_stream_over_a_shared_system_prompt_in_a_server_process(tmp_path: Path) -> None:
    """The real process, as deployed: chat streaming, n choices, stop, and prefix-cache hits."""
    model_dir = make_model_dir(tmp_path / "m", block_size=128, train_steps=20)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(model_dir)]
    proc = subprocess.Popen(
        [*cmd, "--host", "127.0.0.1", "--port", str(port), "--kv-block-tokens", "8", "--threads", "1"],
        env={**_env(), "CAPSTAN_DEVICE": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    system = {"role": "system", "content": "paged attention keeps the kv cache in fixed size blocks."}
    try:
        async with aiohttp.ClientSession() as s:
            assert (await wait_ready(s, url, proc))["device"] == "cpu"
            answers = []
            for user in ("the quick", "a capstan"):
                body = {
                    "messages": [system, {"role": "user", "content": user}],
                    "max_tokens": 12,
                    "n": 2,
                    "seed": 1,
                    "stream": True,
                    "stop": ["zz"],
                }
                async with s.post(f"{url}/v1/chat/completions", json=body) as r:
                    assert r.status == 200
                    raw = (await r.read()).decode()
                events = [e[6:] for e in raw.split("\n\n") if e]
                assert events[-1] == "[DONE]"
                chunks = [json.loads(e) for e in events[:-1]]
                assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
                answers.append(chunks)
            async with s.get(f"{url}/metrics") as r:
                metrics = await r.text()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # The second conversation found the system prompt's full 8-token blocks in the cache.
    hits = next(line for line in metrics.splitlines() if line.startswith("capstan_serving_prefix_cache_hit"))
    assert float(hits.split()[-1]) >= 8 * (len("system: " + system["content"]) // 8)
