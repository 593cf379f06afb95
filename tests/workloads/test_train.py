"""The reference trainer as users run it: real torchrun gangs of gloo workers on this machine."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from capstan.local.workers import free_port
from capstan_workloads.exitcodes import EXIT_BAD_ARGS, EXIT_PREEMPTED
from capstan_workloads.export import full_state_dict, write_export
from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.tokenizer import Tokenizer

STEPS = 80
TINY = [
    "--steps", str(STEPS), "--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--seq-len", "32",
    "--batch-size", "8", "--lr", "3e-3", "--seed", "7", "--corpus-chars", "200000", "--metrics-port", "0",
    "--checkpoint-every", "10", "--keep", "3", "--log-every", "20",
]
_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK",
              "CAPSTAN_CHECKPOINT_DIR", "CAPSTAN_EXPORT_DIR", "CAPSTAN_METRICS_PORT")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start_gang(ckpt: Path, *flags: str, restart: int = 0) -> list[subprocess.Popen[str]]:
    """Two nodes of one gloo worker each, launched exactly as the local executor does (PET_* env)."""
    port = str(free_port())
    procs = []
    for node in range(2):
        env = _env(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=port, PET_NNODES="2",
                   PET_NODE_RANK=str(node), PET_NPROC_PER_NODE="1", CAPSTAN_RESTART_COUNT=str(restart),
                   CAPSTAN_CHECKPOINT_DIR=str(ckpt))
        cmd = [sys.executable, "-m", "torch.distributed.run", "-m", "capstan_workloads.train", *TINY, *flags]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def torchrun(ckpt: Path, *flags: str, restart: int = 0) -> tuple[int, str]:
    """One node, two gloo workers (``--nproc-per-node 2``); returns (exit code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "capstan_workloads.train", "--checkpoint-dir", str(ckpt), *TINY, *flags]
    p = subprocess.run(cmd, env=_env(CAPSTAN_RESTART_COUNT=str(restart)), capture_output=True, text=True,
                       timeout=180)
    return p.returncode, p.stdout + p.stderr


def wait_all(procs: list[subprocess.Popen[str]], timeout: float = 180) -> tuple[list[int], str]:
    out = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(out)


def losses(ckpt: Path, restart: int | None = None) -> dict[int, float]:
    """step -> loss from rank 0's JSONL log (one attempt, or the last record per step)."""
    out: dict[int, float] = {}
    for line in (ckpt / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if restart is None or rec["restart"] == str(restart):
            out[rec["step"]] = rec["loss"]
    return out


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def wait_for(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_same_curve(got: dict[int, float], want: dict[int, float], steps: range, rel: float = 1e-5) -> None:
    assert [s for s in steps if s not in got] == [], "steps missing from the loss log"
    for s in steps:
        assert got[s] == pytest.approx(want[s], rel=rel), f"step {s}: {got[s]} != uninterrupted {want[s]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """An uninterrupted two-node run; the yardstick for the resume tests."""
    ckpt = tmp_path_factory.mktemp("reference")
    codes, out = wait_all(start_gang(ckpt))
    assert codes == [0, 0], out
    yield ckpt, out


@pytest.mark.slow
def test_two_node_gang_trains_checkpoints_and_exports(reference: tuple[Path, str]) -> None:
    ckpt, out = reference
    curve = losses(ckpt)
    assert sorted(curve) == list(range(1, STEPS + 1))
    first, last = curve[1], sum(curve[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    vocab = GPTConfig.from_file(ckpt / "export" / "config.json").vocab_size
    assert first == pytest.approx(math.log(vocab), abs=0.3)  # ~uniform over the vocabulary at init
    assert last < first - 1.0, f"loss did not go down: {first:.3f} -> {last:.3f}"
    assert f"step {STEPS}/{STEPS} | loss" in out and "tok/s" in out
    assert f"exported model to {(ckpt / 'export').resolve()}" in out
    # retention: the newest three; `latest` names the newest
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000060", "step-00000070", "step-00000080"]
    assert (ckpt / "latest").read_text().strip() == "step-00000080"
    assert sorted(p.name for p in (ckpt / "export").iterdir()) == ["config.json", "model.safetensors",
                                                                    "tokenizer.json"]


@pytest.mark.slow
def test_killed_worker_gang_restart_resumes_on_the_same_loss_curve(
    reference: tuple[Path, str], tmp_path: Path
) -> None:
    want = losses(reference[0])
    gang = start_gang(tmp_path)
    # Kill node 1's worker with SIGKILL as soon as a checkpoint is committed: mid-run, maybe mid-save.
    # Generous: two torch processes start and rendezvous first, slow on a loaded 2-core machine.
    wait_for(lambda: (tmp_path / "latest").exists() or gang[1].poll() is not None, 300, "a checkpoint")
    workers = children(gang[1].pid)
    assert workers, "node 1 has no worker process to kill"
    os.kill(workers[0], signal.SIGKILL)
    codes, out = wait_all(gang)
    assert codes[1] != 0, out
    first_attempt = losses(tmp_path, restart=0)
    assert max(first_attempt) < STEPS, "the run finished before the worker was killed"
    assert_same_curve(first_attempt, want, range(1, max(first_attempt) + 1))

    latest = (tmp_path / "latest").read_text().strip()
    resumed_step = int(latest.removeprefix("step-"))
    codes, out = wait_all(start_gang(tmp_path, restart=1))  # the runtime restarts the whole gang
    assert codes == [0, 0], out
    assert f"resumed from {latest} (step {resumed_step})" in out
    second_attempt = losses(tmp_path, restart=1)
    assert min(second_attempt) == resumed_step + 1
    assert_same_curve(second_attempt, want, range(resumed_step + 1, STEPS + 1))
    assert (tmp_path / "latest").read_text().strip() == f"step-{STEPS:08d}"


@pytest.mark.slow
def test_truncated_newest_checkpoint_is_skipped_for_the_previous_one(
    reference: tuple[Path, str], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference[0], ckpt)
    (ckpt / "losses.jsonl").unlink()
    shard = max((ckpt / "step-00000080").glob("*.distcp"), key=lambda p: p.stat().st_size)
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    # What a worker killed in the middle of a save leaves behind: a temporary directory.
    (ckpt / ".tmp-step-00000090").mkdir()
    (ckpt / ".tmp-step-00000090" / "__0_0.distcp").write_bytes(b"partial")

    code, out = torchrun(ckpt, restart=1)
    assert code == 0, out
    assert "WARNING checkpoint step-00000080 is unusable" in out and "falling back" in out
    assert "resumed from step-00000070 (step 70)" in out
    assert_same_curve(losses(ckpt), losses(reference[0]), range(71, STEPS + 1))
    assert (ckpt / "step-00000080.corrupt").is_dir()
    assert not (ckpt / ".tmp-step-00000090").exists()
    assert (ckpt / "latest").read_text().strip() == "step-00000080"


@pytest.mark.slow
def test_sigterm_finishes_the_step_checkpoints_and_exits_75(tmp_path: Path) -> None:
    # `python -m capstan_workloads.train` outside torchrun launches it in-process and keeps exit codes;
    # the signal goes to that top process, as the kubelet sends it to a container's PID 1.
    cmd = [sys.executable, "-m", "capstan_workloads.train", *TINY, "--steps", "100000",
           "--checkpoint-every", "0"]
    env = _env(PET_NPROC_PER_NODE="2", CAPSTAN_CHECKPOINT_DIR=str(tmp_path))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "losses.jsonl"
    wait_for(lambda: (log.exists() and len(log.read_text().splitlines()) >= 3) or proc.poll() is not None,
             120, "three training steps")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_PREEMPTED, out
    last_step = max(losses(tmp_path))
    assert f"preempted after step {last_step}: checkpoint step-{last_step:08d} is committed" in out
    assert (tmp_path / "latest").read_text().strip() == f"step-{last_step:08d}"
    assert (tmp_path / f"step-{last_step:08d}" / "manifest.json").is_file()
    assert not (tmp_path / "export").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # dcp.load(no_dist=True) below
def test_fsdp_with_grad_accum_resumes_a_ddp_checkpoint_and_exports_full_weights(
    reference: tuple[Path, str], tmp_path: Path
) -> None:
    # DCP reshards on load: the DDP run's step 70 continues under FSDP2 on the same loss curve,
    # here with each batch of 8 split into two accumulated micro-batches of 4 (same gradients).
    shutil.copytree(reference[0] / "step-00000070", tmp_path / "step-00000070")
    (tmp_path / "latest").write_text("step-00000070\n")
    code, out = torchrun(tmp_path, "--strategy", "fsdp", "--batch-size", "4", "--grad-accum", "2")
    assert code == 0, out
    assert "strategy fsdp" in out and "resumed from step-00000070 (step 70)" in out
    assert_same_curve(losses(tmp_path), losses(reference[0]), range(71, STEPS + 1), rel=1e-4)

    # The export equals the trained (sharded) weights of the last checkpoint, gathered in full.
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    model = GPT(GPTConfig.from_file(tmp_path / "export" / "config.json"))
    model.load_state_dict(exported, strict=True)
    saved = {"app": {"model": {k: torch.empty_like(v) for k, v in exported.items()}}}
    dcp.load(saved, checkpoint_id=tmp_path / f"step-{STEPS:08d}", no_dist=True)
    for name, tensor in saved["app"]["model"].items():
        assert torch.equal(tensor, exported[name]), name

    ddp_model = GPT(GPTConfig.from_file(reference[0] / "export" / "config.json"))
    ddp_model.load_state_dict(load_file(str(reference[0] / "export" / "model.safetensors")), strict=True)
    tok = Tokenizer.load(tmp_path / "export" / "tokenizer.json")
    ids = torch.tensor([tok.encode("The trainer saves the weights.")])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids)[0], ddp_model.eval()(ids)[0], rtol=1e-3, atol=1e-3)


def test_export_loads_back_into_gpt_with_the_same_logits(tmp_path: Path) -> None:
    tok = Tokenizer.build(["hello capstan"])
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)  # as trained: names get "module."
        write_export(full_state_dict(wrapped), cfg, tok, tmp_path / "export")
    finally:
        dist.destroy_process_group()

    # Exactly what the inference server does with the three files.
    served = GPT(GPTConfig.from_file(tmp_path / "export" / "config.json"))
    served.load_state_dict(load_file(str(tmp_path / "export" / "model.safetensors")), strict=True)
    served_tok = Tokenizer.load(tmp_path / "export" / "tokenizer.json")
    ids = torch.tensor([served_tok.encode("hello", bos=True)])
    with torch.no_grad():
        assert torch.equal(served.eval()(ids)[0], model(ids)[0])
    assert served_tok.chars == tok.chars


def test_bad_arguments_exit_2_without_starting_workers(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "capstan_workloads.train", "--n-embd", "65", "--n-head", "4"]
    p = subprocess.run(cmd, env=_env(CAPSTAN_CHECKPOINT_DIR=str(tmp_path)), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == EXIT_BAD_ARGS
    assert "--n-embd 65 is not divisible by --n-head 4" in p.stderr
    assert list(tmp_path.iterdir()) == []
