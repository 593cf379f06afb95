"""``bench/scale.py`` stops its operators when it is told to stop (SIGTERM or SIGINT), rather than
leaving them running against the cluster, and its cleanup runs on the way out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    sys.path[:0] = [{bench!r}, {repo!r}]
    import scale
    from tests.faults.faults import OperatorProcess

    op = OperatorProcess("ns", "unused", Path("."))
    op._proc = subprocess.Popen(["sleep", "300"])  # stands for a running operator
    scale._LIVE.append(op)
    scale.install_signal_handlers()
    print(op._proc.pid, flush=True)
    try:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(30)
    finally:
        print("cleanup", scale._INTERRUPTED, op._stopping.is_set(), op._proc.poll() is not None, flush=True)
    """
)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_operators_then_runs_the_cleanup(sig: str) -> None:
    code = SCRIPT.format(bench=str(REPO / "bench"), repo=str(REPO), sig=sig)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = done.stdout.split()
    assert done.returncode == 128 + getattr(signal, sig), done.stderr
    pid = int(lines[0])
    # the operator was stopped (and reaped) before the cleanup ran, and no restart is due
    assert lines[1:] == ["cleanup", "True", "True", "True"], done.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _job(name: str, uid: str, phase: str, placement: list[str] | None = None) -> dict[str, object]:
    status: dict[str, object] = {
        "phase": phase, "observedGeneration": 1, "attempt": 0,
        "conditions": [{"type": "Admitted", "status": "True"}],
    }
    if placement:
        status["placement"] = {"nodes": placement}
    return {"metadata": {"name": name, "uid": uid, "generation": 1}, "status": status}


def test_the_kills_mode_judges_a_queued_gang_by_what_it_holds() -> None:
    """The bench's kills mode reads a gang still waiting as queued: it must hold no pod and no
    placement (a SIGKILL between the decision and the pods must not leave half a gang behind)."""
    from tests.faults.faults import JobSpec, Snapshot, violations

    from capstan.labels import LABEL_ATTEMPT, LABEL_JOB_UID, LABEL_RANK

    spec = JobSpec("j0", workers=2, gpus=8, expect="Queued")
    clean = Snapshot(jobs=[_job("j0", "u0", "Queued")], pods=[], services=[], pvcs=[])
    assert violations(clean, [spec]) == []
    labels = {LABEL_JOB_UID: "u0", LABEL_ATTEMPT: "0", LABEL_RANK: "0"}
    stray = {"metadata": {"name": "j0-0", "labels": labels,
                          "ownerReferences": [{"kind": "TrainingJob", "uid": "u0"}]}}
    half = Snapshot(jobs=[_job("j0", "u0", "Queued", ["n1"])], pods=[stray], services=[], pvcs=[])
    found = violations(half, [spec])
    assert any("queued, yet has pods ['j0-0']" in v for v in found), found
    assert any("queued, yet placed" in v for v in found), found
