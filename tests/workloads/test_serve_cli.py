"""``python -m capstan_workloads.serve`` as the local executor starts it: a subprocess, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import capstan_workloads
from capstan.local.workers import free_port
from capstan_workloads.serve.testing import make_model_dir

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
            for _ in range(300):
                try:
                    async with s.get(f"{url}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                await asyncio.sleep(0.1)
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
