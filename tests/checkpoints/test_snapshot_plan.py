"""Snapshot schedule and retention of a TrainingJob's checkpoint volume, planned without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.api.bodies import make_trainingjob

from capstan.api.trainingjob import TrainingJob
from capstan.checkpoints.snapshots import SnapshotsSeen, plan_snapshots, snapshots_in_use, with_snapshots
from capstan.training.lifecycle import Plan

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def job(phase: str = "Running", attempt: int = 0, keep: int = 2, **status: Any) -> TrainingJob:
    checkpoint = {
        "volume": {"size": "100Gi"},
        "snapshots": {"everyMinutes": 30, "keep": keep, "volumeSnapshotClassName": "csi"},
    }
    return (
        make_trainingjob("gpt").uid("u1").spec(checkpoint=checkpoint)
        .status(phase=phase, attempt=attempt, startTime="2026-03-01T11:00:00Z", **status).model()
    )


def snap(name: str, minutes_ago: int, ready: bool = True, reason: str = "Scheduled") -> dict[str, Any]:
    created = (T0 - timedelta(minutes=minutes_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "metadata": {
            "name": name,
            "labels": {"capstan.dev/snapshot-reason": reason},
            "annotations": {"capstan.dev/step": str(1000 - minutes_ago)},
            "creationTimestamp": created,
        },
        "status": {"readyToUse": ready, "creationTime": created},
    }


def test_first_scheduled_snapshot_after_interval(k8s_valid: Any) -> None:
    plan = plan_snapshots(job(), [], set(), T0, api_available=True, step=420)
    assert len(plan.create) == 1
    vs = plan.create[0]
    assert vs["kind"] == "VolumeSnapshot" and vs["spec"]["source"]["persistentVolumeClaimName"] == "gpt-ckpt"
    assert vs["spec"]["volumeSnapshotClassName"] == "csi"
    assert vs["metadata"]["annotations"]["capstan.dev/step"] == "420"
    assert "ownerReferences" not in vs["metadata"]  # snapshots outlive the job
    assert plan.requeue_after == 5  # poll until the CSI controller marks it ready


def test_not_due_yet_waits() -> None:
    plan = plan_snapshots(job(), [snap("gpt-ckpt-a", 10)], set(), T0, api_available=True)
    assert plan.create == [] and plan.requeue_after == 20 * 60


def test_same_trigger_is_idempotent() -> None:
    first = plan_snapshots(job(phase="Succeeded"), [], set(), T0, api_available=True)
    assert [c["metadata"]["name"] for c in first.create] == ["gpt-ckpt-final"]
    taken = {**first.create[0], "status": {"readyToUse": False}}
    again = plan_snapshots(
        job(phase="Succeeded"), [taken], set(), T0 + timedelta(minutes=5), api_available=True
    )
    assert again.create == []


def test_snapshot_before_gang_restart_once_workers_stopped() -> None:
    restarting = job(phase="Restarting", attempt=2)
    # Old workers still checkpointing on SIGTERM: not yet.
    assert plan_snapshots(restarting, [], set(), T0, api_available=True, workers_stopped=False).create == []
    plan = plan_snapshots(restarting, [], set(), T0, api_available=True, workers_stopped=True)
    assert [c["metadata"]["name"] for c in plan.create] == ["gpt-ckpt-restart-2"]


def test_retention_keeps_newest_and_in_use() -> None:
    snaps = [snap("s1", 200), snap("s2", 150), snap("s3", 100), snap("s4", 50), snap("s5", 5, ready=False)]
    plan = plan_snapshots(job(keep=2), snaps, in_use={"s1"}, now=T0, api_available=True)
    assert sorted(plan.delete) == ["s2"]  # s1 in use, s3+s4 newest ready, s5 not ready yet
    assert [r.name for r in plan.records] == ["s1", "s3", "s4", "s5"]
    assert plan.condition is not None and plan.condition[0] is True and "s4" in plan.condition[2]


def test_keep_one_never_deletes_newest_ready() -> None:
    snaps = [snap("old", 90), snap("new", 40), snap("pending", 1, ready=False)]
    plan = plan_snapshots(job(keep=1), snaps, set(), T0, api_available=True)
    assert plan.delete == ["old"]


def test_no_snapshot_api_says_so_and_goes_on() -> None:
    plan = plan_snapshots(job(), [], set(), T0, api_available=False)
    assert plan.create == [] and plan.condition is not None
    assert plan.condition[:2] == (False, "SnapshotAPIUnavailable")


def test_in_use_from_modelservings() -> None:
    mss = [
        {"spec": {"model": {"fromTrainingJob": {"name": "gpt", "checkpoint": "pinned"}}}},
        {
            "spec": {"model": {"fromTrainingJob": {"name": "gpt", "checkpoint": "Latest"}}},
            "status": {"revisions": [{"name": "r1", "model": "snapshot:gpt/gpt-ckpt-final"}]},
        },
        {"spec": {"model": {"fromTrainingJob": {"name": "other", "checkpoint": "x"}}}},
    ]
    assert snapshots_in_use(mss, "gpt") == {"pinned", "gpt-ckpt-final"}


def test_same_second_snapshots_order_by_attempt_and_trigger() -> None:
    restart = snap("a-restart", 0, reason="Restart")
    final = snap("z-final", 0, reason="Completion")  # same creation second, name sorts last anyway
    final2 = snap("b-final", 0, reason="Completion")
    plan = plan_snapshots(job(phase="Succeeded", keep=1), [final2, restart], set(), T0, api_available=True)
    assert plan.delete == ["a-restart"]  # the completion snapshot is the newest, whatever its name
    plan = plan_snapshots(job(phase="Succeeded", keep=1), [final, restart], set(), T0, api_available=True)
    assert plan.delete == ["a-restart"]


def test_the_lifecycle_plan_gets_the_snapshot_records_condition_and_recheck() -> None:
    tj = job()
    on_created = tj.status.model_copy(deep=True)
    plan = Plan(status=tj.status.model_copy(deep=True), requeue_after=600.0, on_created=on_created)
    seen = SnapshotsSeen([snap("s1", 40), snap("s2", 1, ready=False)], set(), available=True)
    folded, snaps = with_snapshots(tj, plan, [], seen, T0)
    assert snaps.create == [] and folded.requeue_after == 5  # polls the pending snapshot, sooner
    for status in (folded.status, folded.on_created):
        assert status is not None and [r.name for r in status.checkpoints] == ["s1", "s2"]
        ready = next(c for c in status.conditions if c.type == "CheckpointReady")
        assert (ready.status, ready.reason) == ("True", "SnapshotReady") and "s1" in ready.message
    assert plan.status.checkpoints == [] and plan.requeue_after == 600.0  # the input plan is kept as it was
    # without the snapshot API: no records are claimed, the condition says why
    folded, _ = with_snapshots(tj, plan, [], SnapshotsSeen([], set(), available=False), T0)
    unavailable = next(c for c in folded.status.conditions if c.type == "CheckpointReady")
    assert folded.status.checkpoints == [] and unavailable.reason == "SnapshotAPIUnavailable"
