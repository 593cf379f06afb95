"""``launcher: deepspeed`` on the local executor: every worker runs DeepSpeed's own launcher
(``deepspeed --no_ssh --node_rank=N`` with the hostfile Capstan writes), gloo on CPU.

Needs DeepSpeed in the venv (``pip install 'capstan[deepspeed]'``); skipped without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from tests.api.bodies import make_trainingjob

from capstan.local.training import run_trainingjob
from capstan.local.workers import expand_vars

pytest.importorskip("torch")
ALLREDUCE = str(Path(__file__).parent.parent / "fixtures" / "allreduce.py")


def test_kubelet_variable_expansion() -> None:
    env = {"RANK": "3", "ADDR": "a.b"}
    assert expand_vars("--node_rank=$(RANK) --master_addr=$(ADDR)", env) == "--node_rank=3 --master_addr=a.b"
    assert expand_vars("$$(RANK) $(MISSING) $$", env) == "$(RANK) $(MISSING) $"


@pytest.mark.slow
def test_reference_trainer_under_deepspeed_forms_one_gang(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    job = (
        make_trainingjob("ds").image("unused-locally").workers(2)
        .spec(
            launcher="deepspeed",
            args=["--module", "capstan_workloads.train", "--steps", "4", "--checkpoint-every", "2",
                  "--log-every", "1", "--batch-size", "4", "--corpus-chars", "20000"],
            env=[{"name": "OMP_NUM_THREADS", "value": "1"}],
            failurePolicy={"backoffSeconds": 0, "maxRestarts": 0},
        )
        .model()
    )
    lines: list[str] = []
    run = run_trainingjob(job, tmp_path, print_fn=lines.append, timeout_s=240)
    assert run.job.status.phase == "Succeeded", "\n".join(lines[-40:])
    out = "\n".join(lines)
    assert "world size 2 on cpu" in out  # both pods' processes joined one gang through DeepSpeed
    assert "--local_rank=0" in out  # started by deepspeed.launcher.launch, not torchrun
    hostfile = (tmp_path / "ds" / "pods" / "attempt-0" / "ds-1" / "hostfile").read_text()
    assert hostfile == "ds-0.ds-workers slots=1\nds-1.ds-workers slots=1\n"
    assert (tmp_path / "ds" / "checkpoints" / "export" / "model.safetensors").is_file()


@pytest.mark.slow
def test_deepspeed_keeps_a_workers_exit_code_for_the_failure_policy(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    job = (
        make_trainingjob("dsfail").image("unused-locally").workers(2)
        .spec(
            launcher="deepspeed",
            args=[ALLREDUCE],
            env=[{"name": "FAIL_RANK", "value": "1"}, {"name": "FAIL_CODE", "value": "2"}],
            failurePolicy={"backoffSeconds": 0, "maxRestarts": 3, "nonRetryableExitCodes": [2]},
        )
        .model()
    )
    run = run_trainingjob(job, tmp_path, print_fn=lambda _: None, timeout_s=180)
    st = run.job.status
    assert st.phase == "Failed" and st.restarts == 0
    failed = next(c for c in st.conditions if c.type == "Failed")
    assert failed.reason == "NonRetryableExitCode" and "exited with code 2" in failed.message


def test_missing_deepspeed_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from capstan.local.workers import resolve_command

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    pod = {"spec": {"containers": [{"command": ["deepspeed"], "args": ["--no_ssh"]}]}}
    with pytest.raises(FileNotFoundError, match="launcher deepspeed: pip install deepspeed"):
        resolve_command(pod, {})
