"""The checkpoint manager keeps one stager for the whole run, whatever ``dcp.async_save`` does to it.

Found on a GPU machine with torch 2.11: ``async_save`` closed the stager it was given once a save
was staged, so the run's second checkpoint failed (``KeyError: <class 'type'>``) and the trainer
died. Here ``async_save`` is wrapped to close its stager the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.distributed.checkpoint as dcp  # noqa: E402

from capstan_workloads.checkpoint import CheckpointManager  # noqa: E402


def test_a_stager_closed_by_async_save_still_stages_the_next_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = dcp.async_save

    def closing_async_save(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        kwargs["async_stager"].close()
        return result

    monkeypatch.setattr(dcp, "async_save", closing_async_save)
    mgr = CheckpointManager(tmp_path, keep=3, rank=0)
    try:
        for step in (1, 2, 3):
            mgr.save(step, {"model": {"w": torch.full((4,), float(step))}, "step": step})
            mgr.wait()
    finally:
        mgr.close()
    newest = mgr.find_resumable()
    assert newest is not None and newest.name.endswith("3")
    state = {"model": {"w": torch.zeros(4)}, "step": 0}
    mgr.load(newest, state)
    assert state["model"]["w"].tolist() == [3.0] * 4
