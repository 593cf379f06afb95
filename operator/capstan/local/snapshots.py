"""Local checkpoint snapshots: hard-link trees of the checkpoint directory (copies across devices)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from capstan.api.conditions import rfc3339
from capstan.api.trainingjob import CheckpointRecord


@dataclass(frozen=True)
class LocalSnapshot:
    """A snapshot directory: a frozen view of the checkpoint dir at one step."""

    name: str
    path: Path
    step: int | None
    time: str
    reason: str

    def record(self) -> CheckpointRecord:
        """The ``status.checkpoints`` entry for this snapshot."""
        return CheckpointRecord(
            name=self.name, step=self.step, time=self.time, ready_to_use=True, reason=self.reason
        )

    @property
    def export_dir(self) -> Path:
        """Where the exported model lies inside the snapshot."""
        return self.path / "export"


def latest_step(checkpoint_dir: Path) -> int | None:
    """Step of the checkpoint the ``latest`` pointer names (``step-00000120`` → 120)."""
    pointer = checkpoint_dir / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    try:
        return int(name.rsplit("-", 1)[-1])
    except ValueError:
        return None


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)  # checkpoint files are written once and renamed, so sharing inodes is safe
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link, symlinks=True)


def copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src``'s content into the (existing, empty) directory ``dst``, hard-linking files."""
    for child in src.iterdir():
        if child.is_dir():
            _link_tree(child, dst / child.name)
        else:
            _link_tree_file(child, dst / child.name)


def _link_tree_file(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def take_snapshot(
    checkpoint_dir: Path, snapshot_root: Path, job_name: str, reason: str
) -> LocalSnapshot | None:
    """Snapshot ``checkpoint_dir`` into ``snapshot_root/<job>-<step>``; None if it holds nothing."""
    if not checkpoint_dir.is_dir() or not any(checkpoint_dir.iterdir()):
        return None
    step = latest_step(checkpoint_dir)
    name = f"{job_name}-{step if step is not None else 'final'}"
    dest = snapshot_root / name
    if not dest.exists():
        tmp = snapshot_root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        snapshot_root.mkdir(parents=True, exist_ok=True)
        _link_tree(checkpoint_dir, tmp)
        tmp.rename(dest)  # atomic: a reader never sees half a snapshot
    return LocalSnapshot(name=name, path=dest, step=step, time=rfc3339(datetime.now(UTC)), reason=reason)


def list_snapshots(snapshot_root: Path) -> list[LocalSnapshot]:
    """Snapshots under ``snapshot_root``, oldest first (by step, then name)."""
    if not snapshot_root.is_dir():
        return []
    out = []
    for path in snapshot_root.iterdir():
        if path.name.startswith(".") or not path.is_dir():
            continue
        step = latest_step(path)
        mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        out.append(LocalSnapshot(path.name, path, step, rfc3339(mtime), "Completion"))
    return sorted(out, key=lambda s: (s.step if s.step is not None else -1, s.name))
