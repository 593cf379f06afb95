"""End to end on the local executor: train with 2 workers, snapshot, serve the snapshot, query it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from tests.api.bodies import make_modelserving, make_trainingjob

from capstan.local.serving import LocalServingError, resolve_model_dir
from capstan.local.session import run_local

pytest.importorskip("torch")

TRAIN_ARGS = [
    "-m",
    "capstan_workloads.train",
    "--steps",
    "16",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--n-layer",
    "1",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--checkpoint-every",
    "8",
    "--log-every",
    "4",
]


def resources(job_name: str = "tiny", checkpoint: str = "Latest") -> list[Any]:
    return [
        make_trainingjob("tiny")
        .image("local", sys.executable, "-m", "torch.distributed.run")
        .workers(2)
        .spec(
            args=TRAIN_ARGS,
            env=[{"name": "OMP_NUM_THREADS", "value": "1"}],
            checkpoint={"volume": {"size": "1Gi"}},
        )
        .model(),
        make_modelserving("tiny-llm").from_training_job(job_name, checkpoint).spec(gpu=False).model(),
    ]


@pytest.mark.slow
def test_train_snapshot_serve_query(tmp_path: Path, capsys: Any) -> None:
    assert run_local(resources(), tmp_path, prompts=["the "]) == 0
    out = capsys.readouterr().out
    assert "trainingjob/tiny Succeeded" in out
    assert "snapshot tiny-16 of step 16" in out
    assert "completion for 'the ':" in out
    snap = tmp_path / "tiny" / "snapshots" / "tiny-16"
    assert (snap / "export" / "model.safetensors").is_file() and (snap / "latest").read_text().strip()
    # The snapshot is a frozen view: it names the checkpoint it was taken of.
    assert (snap / "latest").read_text().strip() == (
        tmp_path / "tiny" / "checkpoints" / "latest"
    ).read_text().strip()


def test_serving_without_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    ms = resources(job_name="never-ran")[1]
    with pytest.raises(LocalServingError, match="trainingjob/never-ran has no snapshot"):
        resolve_model_dir(ms, tmp_path)


def test_unknown_named_snapshot_lists_what_exists(tmp_path: Path) -> None:
    (tmp_path / "tiny" / "snapshots" / "tiny-8" / "export").mkdir(parents=True)
    ms = resources(checkpoint="tiny-99")[1]
    with pytest.raises(LocalServingError, match=r"no snapshot 'tiny-99' \(have: tiny-8\)"):
        resolve_model_dir(ms, tmp_path)
