"""The local executor runs a TrainingJob's plan as real torch.distributed processes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.api.bodies import make_trainingjob

from capstan.api.trainingjob import TrainingJob
from capstan.local.training import run_trainingjob

pytest.importorskip("torch")
ALLREDUCE = str(Path(__file__).parent.parent / "fixtures" / "allreduce.py")


def _job(name: str, workers: int, env: dict[str, str] | None = None, **spec: object) -> TrainingJob:
    return (
        make_trainingjob(name)
        .image("unused-locally", sys.executable, ALLREDUCE)
        .workers(workers)
        .spec(
            env=[{"name": k, "value": v} for k, v in (env or {}).items()],
            failurePolicy={"backoffSeconds": 0, "maxRestarts": 2},
        )
        .spec(**spec)
        .model()
    )


@pytest.mark.slow
def test_two_workers_allreduce_and_succeed(tmp_path: Path) -> None:
    lines: list[str] = []
    run = run_trainingjob(_job("ar", 2), tmp_path, print_fn=lines.append, timeout_s=120)
    assert run.job.status.phase == "Succeeded", lines
    assert run.job.status.restarts == 0
    logs = sorted((tmp_path / "ar" / "logs" / "attempt-0").glob("worker-*.log"))
    assert [p.name for p in logs] == ["worker-0.log", "worker-1.log"]
    assert "sum=1.0 expected=1.0" in logs[1].read_text()
    assert any("Succeeded" in line for line in lines)


@pytest.mark.slow
def test_failed_worker_restarts_whole_gang(tmp_path: Path) -> None:
    lines: list[str] = []
    job = _job("flaky", 2, env={"FAIL_RANK": "1", "FAIL_ATTEMPT": "0", "FAIL_CODE": "1"})
    run = run_trainingjob(job, tmp_path, print_fn=lines.append, timeout_s=120)
    st = run.job.status
    assert st.phase == "Succeeded", lines
    assert st.restarts == 1 and st.attempt == 1
    assert any("Restarting" in line and "exit code 1" in line for line in lines)
    # The second gang ran both ranks again, not just the failed one.
    assert len(list((tmp_path / "flaky" / "logs" / "attempt-1").glob("worker-*.log"))) == 2


@pytest.mark.slow
def test_non_retryable_exit_code_fails_job(tmp_path: Path) -> None:
    job = _job(
        "bad-args",
        2,
        env={"FAIL_RANK": "0", "FAIL_ATTEMPT": "0", "FAIL_CODE": "2"},
        failurePolicy={"backoffSeconds": 0, "maxRestarts": 3, "nonRetryableExitCodes": [2]},
    )
    run = run_trainingjob(job, tmp_path, print_fn=lambda _: None, timeout_s=120)
    st = run.job.status
    assert st.phase == "Failed"
    assert st.restarts == 0
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert failed.reason == "NonRetryableExitCode" and "exited with code 2" in failed.message
    # No worker is left running after the job failed.
    assert not [w for w in run.workers.values() if w.proc.poll() is None]
