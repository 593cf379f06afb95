"""Serve a ModelServing on this machine with the reference server, as a process."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capstan.api.modelserving import FromTrainingJob, ModelServing
from capstan.local.snapshots import list_snapshots
from capstan.local.workers import free_port


class LocalServingError(RuntimeError):
    """The ModelServing cannot be served locally; the message says why and what to change."""


def resolve_model_dir(ms: ModelServing, workdir: Path) -> Path:
    """The directory of the exported model a local ModelServing serves."""
    src = ms.spec.model
    if src.from_training_job is None:
        raise LocalServingError(
            f"modelserving/{ms.metadata.name}: spec.model: the local executor serves models from a "
            "TrainingJob (model.fromTrainingJob); model.uri and model.pvc need a cluster"
        )
    model_dir = _snapshot_dir(ms, src.from_training_job, workdir, "spec.model.fromTrainingJob")
    if not (model_dir / "config.json").is_file():
        raise LocalServingError(
            f"modelserving/{ms.metadata.name}: snapshot {model_dir.relative_to(workdir)} has no exported "
            f"model at {model_dir}"
        )
    return model_dir


def resolve_adapter_dirs(ms: ModelServing, workdir: Path) -> list[tuple[str, Path]]:
    """(name, directory) of each of ``spec.adapters``, from the local snapshots of their TrainingJobs."""
    out = []
    for i, a in enumerate(ms.spec.adapters):
        field = f"spec.adapters[{i}]"
        if a.from_training_job is None:
            raise LocalServingError(f"modelserving/{ms.metadata.name}: {field}.uri: the local executor "
                                    "serves adapters from a TrainingJob (fromTrainingJob); a uri needs a "
                                    "cluster")
        path = _snapshot_dir(ms, a.from_training_job, workdir, f"{field}.fromTrainingJob")
        if not (path / "adapter_config.json").is_file():
            raise LocalServingError(f"modelserving/{ms.metadata.name}: {field}.fromTrainingJob.path: no LoRA "
                                    f"adapter (adapter_config.json) at {path}")
        out.append((a.name, path))
    return out


def _snapshot_dir(ms: ModelServing, ref: FromTrainingJob, workdir: Path, field: str) -> Path:
    """``ref.path`` inside the local snapshot of ``ref.name`` that ``ref.checkpoint`` names."""
    snaps = list_snapshots(workdir / ref.name / "snapshots")
    if not snaps:
        raise LocalServingError(
            f"modelserving/{ms.metadata.name}: {field}: trainingjob/{ref.name} has no "
            f"snapshot under {workdir / ref.name / 'snapshots'}; run the TrainingJob first"
        )
    if ref.checkpoint == "Latest":
        snap = snaps[-1]
    else:
        named = [s for s in snaps if s.name == ref.checkpoint]
        if not named:
            have = ", ".join(s.name for s in snaps)
            raise LocalServingError(
                f"modelserving/{ms.metadata.name}: {field}.checkpoint: no snapshot "
                f"{ref.checkpoint!r} (have: {have})"
            )
        snap = named[0]
    return snap.path / ref.path


@dataclass
class LocalServer:
    """A running reference server."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll /readyz until the model is loaded; raise with the server log if it dies first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:]
                raise LocalServingError(
                    f"server for {self.name} exited with {self.proc.returncode}; log:\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        raise LocalServingError(f"server for {self.name} not ready after {timeout_s:.0f}s")

    def complete(self, prompt: str, max_tokens: int = 48, temperature: float = 0.0) -> dict[str, Any]:
        """POST /v1/completions and return the JSON answer."""
        body = json.dumps(
            {"model": self.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature}
        ).encode()
        req = urllib.request.Request(
            f"{self.url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            return dict(json.loads(resp.read()))

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (the server drains), then SIGKILL after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_command(ms: ModelServing, model_dir: Path, port: int) -> list[str]:
    """The reference server's command line for ``ms`` on this machine (spec.quantization included)."""
    cmd = [sys.executable, "-m", "capstan_workloads.serve", "--model-dir", str(model_dir)]
    # Served under the ModelServing's name, as in a cluster (clients send it as "model").
    cmd += ["--port", str(port), "--model-name", ms.metadata.name]
    if ms.spec.quantization:
        cmd += ["--quantization", ms.spec.quantization]
    return cmd


def start_server(ms: ModelServing, workdir: Path) -> LocalServer:
    """Start the reference server for ``ms`` on a free local port."""
    if ms.spec.runtime != "capstan":
        raise LocalServingError(
            f"modelserving/{ms.metadata.name}: spec.runtime {ms.spec.runtime!r} runs only in a cluster; "
            "the local executor serves runtime: capstan"
        )
    model_dir = resolve_model_dir(ms, workdir)
    adapters = resolve_adapter_dirs(ms, workdir)
    port = free_port()
    log_path = workdir / ms.metadata.name / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(ms, model_dir, port)
    if adapters:
        rank = max([64, *(a.rank or 0 for a in ms.spec.adapters)])
        cmd += ["--max-lora-rank", str(rank), "--lora-modules", *(f"{n}={p}" for n, p in adapters)]
    proc = subprocess.Popen(
        cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    return LocalServer(name=ms.metadata.name, proc=proc, port=port, log_path=log_path)
