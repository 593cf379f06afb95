"""Checkpoint yardstick: training stall of async DCP saves vs a blocking save, and GB/s vs the disk.

Everything is measured side by side in one run, on the same directory, medians of ``--reps``:

* ``stall_async_s``: how long the training loop is blocked by ``CheckpointManager.save`` (the
  trainer's own code path: DCP ``async_save`` with host staging; writing, fsync, manifest and
  atomic commit happen in the background).
* ``stall_blocking_s``: a plain blocking ``torch.save`` of the same state, with fsync.
* ``save_gbps`` / ``load_gbps``: state bytes over the time to a durable, committed checkpoint and
  over a ``dcp.load`` from a cold page cache.
* ``disk_write_gbps`` / ``disk_read_gbps``: one file of the same size written with fsync and read
  back cold (``posix_fadvise(DONTNEED)``; ``/proc/sys/vm/drop_caches`` too when writable).

Usage: ``python bench/checkpoint.py [--json] [--reps 3] [--dir /path/on/the/disk]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workloads"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from capstan_workloads.checkpoint import CheckpointManager, TrainState, step_dir_name  # noqa: E402
from capstan_workloads.data import DataStream, TokenWindows, generate_corpus  # noqa: E402
from capstan_workloads.model import GPT, GPTConfig  # noqa: E402
from capstan_workloads.tokenizer import Tokenizer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "checkpoint.json"


def drop_cache(paths: list[Path]) -> None:
    """Evict ``paths`` from the page cache so the next read comes from the disk."""
    with contextlib.suppress(OSError):  # needs privileges; fadvise below works for files we own
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(path: Path) -> list[Path]:
    return [p for p in path.rglob("*") if p.is_file()]


def build_state(n_layer: int, n_embd: int) -> tuple[TrainState, int]:
    """A GPT + AdamW after one step (so Adam's moments exist) and its state size in bytes."""
    text = generate_corpus(20_000)
    tok = Tokenizer.build([text])
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=n_layer, n_head=12, n_embd=n_embd)
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stream = DataStream(TokenWindows.from_text(text, tok, 64), 2, 0, 1, 0)
    x, y = stream.next_batch()
    _, loss = model(x, y)
    assert loss is not None
    loss.backward()
    opt.step()
    state = TrainState(model, opt, sched, stream)
    nbytes = sum(p.nbytes for p in model.parameters())
    nbytes += sum(t.nbytes for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))
    return state, nbytes


def disk_bandwidth(root: Path, nbytes: int) -> tuple[float, float]:
    """(write, read) GB/s of one ``nbytes`` file: written in 64 MiB chunks + fsync, read cold."""
    chunk = os.urandom(64 << 20)
    path = root / "disk-probe.bin"
    t0 = time.perf_counter()
    with path.open("wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(memoryview(chunk)[: min(left, len(chunk))])
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    drop_cache([path])
    t0 = time.perf_counter()
    with path.open("rb", buffering=0) as f:
        while f.read(64 << 20):
            pass
    read_s = time.perf_counter() - t0
    path.unlink()
    return nbytes / write_s / 1e9, nbytes / read_s / 1e9


def blocking_save(root: Path, state: TrainState) -> float:
    """Seconds of a blocking ``torch.save`` of the same state, fsynced: all of it is stall."""
    path = root / "blocking.pt"
    t0 = time.perf_counter()
    with path.open("wb") as f:
        torch.save(state.state_dict(), f)
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - t0
    path.unlink()
    return elapsed


def run(root: Path, reps: int, n_layer: int, n_embd: int, threads: int) -> dict[str, Any]:
    state, nbytes = build_state(n_layer, n_embd)
    print(f"state: {nbytes / 1e6:.0f} MB (params + Adam moments), checkpoint dir {root}", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    commit_s: dict[int, float] = {}
    mgr = CheckpointManager(root, keep=2, rank=0, io_threads=threads,
                            on_commit=lambda step, s: commit_s.__setitem__(step, s))
    stalls, saves, loads, blocking, disk_w, disk_r = [], [], [], [], [], []
    # Rep 0 warms up (allocates the reusable staging buffers, as the first save of a run does).
    for rep in range(reps + 1):
        step = rep + 1
        stall = mgr.save(step, {"app": state})
        mgr.wait()
        ckpt = root / step_dir_name(step)
        drop_cache(files_under(ckpt))
        t0 = time.perf_counter()
        dcp.load({"app": state}, checkpoint_id=ckpt, process_group=mgr.group)
        load_s = time.perf_counter() - t0
        block_s = blocking_save(root, state)
        w, r = disk_bandwidth(root, nbytes)
        if rep == 0:
            continue
        stalls.append(stall)
        saves.append(nbytes / commit_s[step] / 1e9)
        loads.append(nbytes / load_s / 1e9)
        blocking.append(block_s)
        disk_w.append(w)
        disk_r.append(r)
        print(f"rep {rep}: stall async {stall:.3f}s blocking {block_s:.3f}s | save {saves[-1]:.2f} GB/s "
              f"load {loads[-1]:.2f} GB/s | disk write {w:.2f} read {r:.2f} GB/s", file=sys.stderr)
    mgr.close()
    med = statistics.median
    return {
        "model_bytes": nbytes,
        "stall_async_s": round(med(stalls), 4),
        "stall_blocking_s": round(med(blocking), 4),
        "stall_ratio": round(med(stalls) / med(blocking), 4),
        "save_gbps": round(med(saves), 3),
        "load_gbps": round(med(loads), 3),
        "disk_write_gbps": round(med(disk_w), 3),
        "disk_read_gbps": round(med(disk_r), 3),
        "reps": reps,
        "io_threads": threads,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON line at the end")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-embd", type=int, default=768, help="8 x 768 gives ~57M params, ~690 MB of state")
    p.add_argument("--threads", type=int, default=2, help="DCP writer threads")
    p.add_argument("--dir", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = p.parse_args()

    root = Path(tempfile.mkdtemp(prefix="capstan-ckpt-bench-", dir=args.dir))
    dist.init_process_group("gloo", init_method=f"file://{root}/.store", rank=0, world_size=1)
    try:
        result = run(root / "ckpt", args.reps, args.n_layer, args.n_embd, args.threads)
    finally:
        dist.destroy_process_group()
        shutil.rmtree(root, ignore_errors=True)
    result["targets_met"] = {
        "stall_ratio<=0.2": result["stall_ratio"] <= 0.2,
        "save>=0.5*disk_write": result["save_gbps"] >= 0.5 * result["disk_write_gbps"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
