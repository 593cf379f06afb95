"""Asynchronous, atomically committed DCP checkpoints with retention and verified resume.

Layout of the checkpoint directory (the operator reads ``latest`` to report progress)::

    latest                  # one line: the directory name of the newest committed checkpoint
    step-00000120/          # DCP files (.metadata, __0_0.distcp, ...) + manifest.json (written last)
    .tmp-step-00000140/     # a save in flight; never read, removed on the next start
    step-00000100.corrupt/  # a checkpoint that failed verification on resume, kept for inspection

A save goes: ``dcp.async_save`` into ``.tmp-step-N`` (training continues as soon as the state is
copied to host memory) -> every file fsynced -> ``manifest.json`` (sizes, CRC32) -> rename to
``step-N`` -> fsync the parent -> atomically replace ``latest``. A worker killed anywhere in this
sequence leaves at worst a ``.tmp-*`` directory, never a half-written ``latest``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from .data import DataStream

log = logging.getLogger("capstan.train")

LATEST = "latest"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_CHUNK = 8 << 20


def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint taken after ``step``."""
    return f"step-{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint directory name, or None when it is not one."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _crc32_and_size(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return crc, size


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def verify(ckpt: Path, checksums: bool = True) -> str | None:
    """Why ``ckpt`` cannot be used (missing manifest, wrong size or CRC), or None when it is intact."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files: dict[str, dict[str, int]] = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable {MANIFEST} ({e.__class__.__name__}: {e})"
    if ".metadata" not in files:
        return f"{MANIFEST} lists no DCP .metadata"
    for rel, want in files.items():
        p = ckpt / rel
        try:
            size = p.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != want["bytes"]:
            return f"{rel} has {size} bytes, manifest says {want['bytes']}"
        if checksums and _crc32_and_size(p)[0] != want["crc32"]:
            return f"{rel} fails its CRC32 check"
    return None


class TrainState(Stateful):
    """Everything a resume needs except RNG: model, optimizer, LR schedule, data position, step.

    ``get_state_dict`` gives un-wrapped FQNs (no ``module.``) for DDP and sharded DTensors for FSDP2,
    so a checkpoint can be resumed under a different world size or strategy.

    ``base``: the fingerprint of the base model a fine-tune starts from, saved with the checkpoint
    and checked on resume, so a run never resumes on top of a different base. ``trainable_only``
    (LoRA): frozen parameters are not saved, only the adapter and its optimizer state; the base
    model supplies the rest on every start.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: DataStream,
        base: str | None = None,
        trainable_only: bool = False,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.step = 0
        self.base = base
        # strict=False: the frozen keys are absent by design; dcp.load still insists on every saved one.
        self._options = StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options)
        state = {
            "model": model_sd,
            "optim": optim_sd,
            "sched": self.scheduler.state_dict(),
            "data": self.data.state_dict(),
            "step": self.step,
        }
        if self.base is not None:
            state["base"] = self.base
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_base = state_dict.get("base")
        if saved_base != self.base:
            raise ValueError(f"checkpoint was trained on base {saved_base}, but the base model given is "
                             f"{self.base}: resume with the same --base-model or start a new run")
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state_dict["model"],
            optim_state_dict=state_dict["optim"],
            options=self._options,
        )
        self.scheduler.load_state_dict(state_dict["sched"])
        self.data.load_state_dict(state_dict["data"])
        self.step = int(state_dict["step"])


class RNGState(Stateful):
    """This rank's RNG streams (dropout and anything random), saved under a per-rank key."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        random.setstate(state_dict["python"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])


def rng_key(rank: int) -> str:
    """Top-level checkpoint key of ``rank``'s RNG state."""
    return f"rng_rank{rank}"


class CheckpointManager:
    """Saves with ``dcp.async_save`` and commits atomically on rank 0; finds a good one to resume.

    At most one save is in flight: starting a new one first waits for the previous one (that wait
    is counted as training stall, like the copy to host memory).
    """

    def __init__(
        self,
        root: Path,
        keep: int,
        rank: int,
        io_threads: int = 1,
        checksums: bool = True,
        on_commit: Callable[[int, float], None] | None = None,
    ) -> None:
        self.root = root
        self.keep = keep
        self.rank = rank
        self.io_threads = io_threads
        self.checksums = checksums
        self.on_commit = on_commit
        self.last_committed: int | None = None
        # A dedicated gloo group: the save runs its collectives from a background thread, and
        # sharing the training group would let them interleave differently on different ranks.
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        cuda = torch.cuda.is_available()
        self._options = StagingOptions(cuda, False, False, cuda)  # pinned host buffers on GPU
        self._stager: DefaultStager | None = None
        self._commit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="capstan-ckpt")
        self._pending: Future[None] | None = None
        self._pending_step: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- save

    def save(self, step: int, state: dict[str, Any]) -> float:
        """Start saving ``state`` as checkpoint ``step``; return the seconds training was blocked."""
        t0 = time.perf_counter()
        self.wait()
        # A stager per save: dcp.async_save of some torch versions (seen with 2.11 on CUDA) spends
        # the stager it is given, so reusing one failed the run's second save with "KeyError:
        # <class 'type'>". The price is new pinned host buffers for each save.
        if self._stager is not None:
            self._stager.close()
        self._stager = DefaultStager(self._options)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        writer = dcp.FileSystemWriter(tmp, sync_files=True, thread_count=self.io_threads)
        upload = dcp.async_save(
            state, storage_writer=writer, process_group=self.group, async_stager=self._stager
        )
        assert isinstance(upload, Future)
        stall = time.perf_counter() - t0
        self._pending = self._commit_pool.submit(self._finish, step, tmp, upload, t0)
        self._pending_step = step
        return stall

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed."""
        if self._pending is None:
            return
        pending, step = self._pending, self._pending_step
        self._pending = self._pending_step = None
        try:
            pending.result()
        except Exception:
            # Training goes on: the previous checkpoint is still ``latest`` and still valid.
            log.exception("checkpoint %s failed; keeping the previous one", step_dir_name(step or 0))

    def close(self) -> None:
        """Wait for the last save and release the staging buffers and threads."""
        self.wait()
        self._commit_pool.shutdown()
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def _finish(self, step: int, tmp: Path, upload: Future[Any], t0: float) -> None:
        # DCP's coordinator (rank 0) writes .metadata only after every rank reported its files
        # written and fsynced, so rank 0's future completing means the whole checkpoint is on disk.
        upload.result()
        if self.is_main:
            self._commit(step, tmp)
            self.last_committed = step
            if self.on_commit is not None:
                self.on_commit(step, time.perf_counter() - t0)
            self._retain(step_dir_name(step))  # housekeeping, after the checkpoint is durable

    def _commit(self, step: int, tmp: Path) -> None:
        paths = sorted(p for p in tmp.rglob("*") if p.is_file())
        # DCP already fsynced the data files; the CRC pass reads them back from the page cache,
        # one thread per file (zlib releases the GIL) so it costs a fraction of the write.
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
            sums = list(pool.map(_crc32_and_size, paths))
        files = {
            p.relative_to(tmp).as_posix(): {"bytes": size, "crc32": crc}
            for p, (crc, size) in zip(paths, sums, strict=True)
        }
        for p in paths:
            fsync_path(p)
        manifest = {"step": step, "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                    "created": time.time(), "files": files}
        write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        final = self.root / step_dir_name(step)
        if final.exists():  # left by a timeline that was rolled back (a corrupt newer checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_path(self.root)
        write_atomic(self.root / LATEST, final.name + "\n")

    def _retain(self, latest: str) -> None:
        committed = sorted(p for p in self.root.iterdir() if parse_step(p.name) is not None)
        for old in committed[: max(0, len(committed) - self.keep)]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    # ---------------------------------------------------------------- resume

    def read_latest(self) -> str | None:
        """The directory name in ``latest``, or None when there is no (valid) pointer."""
        try:
            name = (self.root / LATEST).read_text().strip()
        except OSError:
            return None
        return name if parse_step(name) is not None else None

    def find_resumable(self) -> Path | None:
        """Rank 0: the newest intact checkpoint, starting at ``latest``.

        Damaged ones are renamed ``*.corrupt`` with a warning and ``latest`` is pointed at the one
        chosen, so the operator reports the step training really resumes from. Leftover ``.tmp-*``
        directories (saves cut short by a crash) are removed.
        """
        if not self.root.is_dir():
            return None
        for p in self.root.glob(".tmp-step-*"):
            shutil.rmtree(p, ignore_errors=True)
        dirs = {s: p for p in self.root.iterdir() if p.is_dir() and (s := parse_step(p.name)) is not None}
        latest = self.read_latest()
        latest_step = parse_step(latest) if latest else None
        order = sorted(dirs, reverse=True)
        if latest_step is not None:
            # A directory newer than ``latest`` means a crash between its rename and the pointer
            # update; ``latest`` is the last checkpoint known committed, so start there.
            order = [s for s in order if s <= latest_step]
            if latest_step not in dirs:
                log.warning("latest names %s, which does not exist; looking for an older checkpoint", latest)
        for s in order:
            path = dirs[s]
            problem = verify(path, self.checksums)
            if problem is None:
                if path.name != latest:
                    write_atomic(self.root / LATEST, path.name + "\n")
                return path
            quarantine = path.with_name(path.name + ".corrupt")
            while quarantine.exists():
                quarantine = quarantine.with_name(quarantine.name + "_")
            log.warning(
                "checkpoint %s is unusable (%s): moved to %s, falling back to the previous checkpoint",
                path.name, problem, quarantine.name,
            )
            os.rename(path, quarantine)
        return None

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Load ``path`` into ``state`` in place (every rank); per-rank keys absent there are skipped."""
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        present = {k.split(".", 1)[0] for k in saved}
        # RNG streams are per rank: a resume at a different world size re-seeds the new ranks.
        wanted = {k: v for k, v in state.items() if k in present or not k.startswith("rng_rank")}
        dcp.load(wanted, checkpoint_id=path, process_group=self.group)
