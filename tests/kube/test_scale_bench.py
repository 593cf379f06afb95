"""``bench/scale.py`` stops its operators when it is told to stop (SIGTERM or SIGINT), rather than
leaving them running against the cluster, and its cleanup runs on the way out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

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


def _bench() -> object:
    sys.path[:0] = [str(REPO / "bench")]
    try:
        import scale  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "bench"))
    return scale


def test_the_observer_times_each_object_when_it_first_runs() -> None:
    """The bench times a burst from watch events: an object counts from the first event that shows
    it Running (later changes do not move it), a deleted one leaves the phases, and pods left
    Pending as unschedulable are counted as such."""
    scale: Any = _bench()
    observer = scale.Observer(cluster=None, namespace="ns", resource="pods")
    unschedulable = {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]}
    observer._seen("ADDED", {"metadata": {"name": "a"}, "status": {"phase": "Pending"}})
    observer._seen("ADDED", {"metadata": {"name": "b"}, "status": unschedulable})
    assert observer.running_at == {} and observer.unschedulable() == 1
    observer._seen("MODIFIED", {"metadata": {"name": "a"}, "status": {"phase": "Running"}})
    first = observer.running_at["a"]
    later = {"phase": "Running", "podIP": "10.0.0.1"}
    observer._seen("MODIFIED", {"metadata": {"name": "a"}, "status": later})
    assert observer.running_at == {"a": first} and observer.changed == first
    observer._seen("DELETED", {"metadata": {"name": "b"}, "status": unschedulable})
    assert observer.phases() == {"a": "Running"} and observer.unschedulable() == 0


def test_the_cpu_sampler_reads_the_busy_share_of_a_window() -> None:
    """The share of the cores busy between two times comes from the /proc/stat samples inside it."""
    scale: Any = _bench()
    sampler = scale.CpuSampler()
    # (time, total jiffies, idle jiffies): 1 s to 2 s, 200 jiffies of which 50 idle
    sampler.samples = [(0.5, 0, 0), (1.0, 100, 80), (1.5, 200, 100), (2.0, 300, 130), (2.5, 400, 230)]
    assert sampler.busy(1.0, 2.0) == 0.75
    assert sampler.busy(1.6, 1.9) is None  # no two samples inside: nothing to say
    work = scale.burst_cpu(sampler, 1.0, 2.0)
    assert work == {"cpu_busy": 0.75, "cpu_work_s": round(0.75 * (os.cpu_count() or 1) * 1.0, 2)}


def test_a_mode_waits_for_a_machine_at_rest() -> None:
    """Each mode starts once the cores were under the threshold for the window (not in the wake of
    the mode before): on a machine busier than the threshold it waits out its timeout."""
    scale: Any = _bench()
    assert scale.quiet_for(1.01, window_s=0.3, timeout_s=5) is not None  # any machine is under 101 %
    started = time.monotonic()
    seen = scale.quiet_for(0.0, window_s=0.3, timeout_s=1.0)  # no machine is under 0 %
    assert time.monotonic() - started >= 1.0 and (seen is None or seen >= 0.0)


def test_rounds_interleave_the_timed_modes_and_take_each_ratio_within_a_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``--rounds 3``: floor, objects and cache run three times in turn (the list mode once, after),
    and each ratio is the median of the ratios within a round, not of times from different rounds."""
    scale: Any = _bench()
    order: list[str] = []
    times = {"floor": [1.0, 2.0, 1.5], "objects": [2.5, 4.2, 3.0], "cache": [3.0, 4.0, 3.3]}

    def timed(mode: str) -> dict[str, Any]:
        order.append(mode)
        return {"from_first_create_s": times[mode][order.count(mode) - 1], "cpu_work_s": 1.0}

    monkeypatch.setattr(scale, "quiet_for", lambda *_a, **_k: 0.0)
    monkeypatch.setattr(scale, "bench_nodes", lambda count, prefix: [])
    monkeypatch.setattr(scale, "run_floor", lambda *_a: timed("floor"))
    monkeypatch.setattr(scale, "run_objects", lambda *_a: timed("objects"))

    def operator(_cluster: Any, _ns: str, _shape: Any, cache: bool, *_a: Any, **_k: Any) -> dict[str, Any]:
        if not cache:
            order.append("list")
            return {"from_first_create_s": 9.0, "cpu_work_s": 2.0}
        return timed("cache")

    monkeypatch.setattr(scale, "run_operator", operator)

    class NoCluster:
        def drop_namespace(self, _ns: str) -> None:
            pass

    modes = ("floor", "objects", "list", "cache")
    out = scale.run_size(NoCluster(), 32, 48, 1, Path("."), 60, modes, rounds=3)
    assert order == ["floor", "objects", "cache"] * 3 + ["list"]
    assert out["floor"]["rounds_s"] == [1.0, 2.0, 1.5] and out["cache"]["rounds_s"] == [3.0, 4.0, 3.3]
    assert out["cache"]["over_floor"] == 2.2  # median of 3.0, 2.0 and 2.2 (times alone would say 2.2 too)
    assert out["objects"]["over_floor"] == 2.1  # median of 2.5, 2.1, 2.0: not 3.0 / 1.5
    assert out["cache"]["over_objects"] == 1.1  # median of 1.2, 0.95, 1.1
    assert out["list"]["over_floor"] == 9.0  # its one run against the first round's floor
