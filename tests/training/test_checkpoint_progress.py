"""Checkpoint progress (status.lastCheckpoint, resumedFromStep) and save-before-stop, with no server.

Rank 0's reports are built by the reference trainer's own code (capstan_workloads.progress and
its metrics registry), so these tests also pin the wire format between trainer and operator.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import generate_latest
from tests.api.bodies import make_trainingjob

from capstan.api.trainingjob import TrainingJob
from capstan.checkpoints.snapshots import SnapshotsSeen, with_snapshots
from capstan.kube.scrape import parse_progress_metrics
from capstan.labels import ANNOTATION_STEP, CHECKPOINT_NOW_ANNOTATION, REQUEST_ANNOTATION
from capstan.training.lifecycle import Plan, plan_trainingjob
from capstan.training.progress import Progress, parse_progress
from capstan_workloads.metrics import TrainMetrics
from capstan_workloads.progress import Progress as TrainerProgress
from capstan_workloads.progress import RequestWatcher, parse_annotations

T0 = datetime(2026, 1, 1, tzinfo=UTC)
VOLUME = {"volume": {"size": "10Gi"}}


def job(workers: int = 2, checkpoint: dict[str, Any] | None = None, **spec: Any) -> TrainingJob:
    return (
        make_trainingjob("gpt").uid("u1").workers(workers)
        .spec(checkpoint=VOLUME if checkpoint is None else checkpoint, **spec).model()
    )


def answering(request: int = 0, step: int | None = 100, resumed: int = -1) -> Progress:
    """What a reference trainer's rank 0 reports on its metrics endpoint."""
    metrics = TrainMetrics()
    if step is not None:
        metrics.committed(step, 0.1)
    metrics.resumed_from_step.set(resumed)
    metrics.checkpoint_request.set(request)
    got = parse_progress_metrics(generate_latest(metrics.registry).decode())
    assert got is not None
    return got


class Gang:
    """A fake API server: pods by name; plans applied as the kube shell applies them."""

    def __init__(self, tj: TrainingJob) -> None:
        self.job = tj
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: list[str] = []

    def reconcile(self, now: datetime = T0, move: str | None = None, rank0: Progress | None = None) -> Plan:
        plan = plan_trainingjob(
            self.job, list(self.pods.values()), now, service_exists=True, pvc_exists=True, move=move,
            rank0=rank0,
        )
        self.job = self.job.model_copy(update={"status": plan.status})
        for obj in plan.create:
            if obj["kind"] == "Pod":
                self.pods[obj["metadata"]["name"]] = {**obj, "status": {"phase": "Pending"}}
        for name, wanted in plan.annotate_pods.items():
            self.pods[name]["metadata"]["annotations"].update(wanted)
        for name in plan.delete_pods:
            self.pods[name]["metadata"]["deletionTimestamp"] = "t"
        self.events += [e.reason for e in plan.events]
        return plan

    def running(self) -> None:
        for pod in self.pods.values():
            pod["status"] = {"phase": "Running"}
        self.reconcile()
        assert self.job.status.phase == "Running"

    def exit(self, code: int, message: str = "") -> None:
        """Every worker exits ``code``; rank 0 leaves ``message`` as its termination message."""
        for pod in self.pods.values():
            rank0 = pod["metadata"]["labels"]["capstan.dev/rank"] == "0"
            term = {"exitCode": code, **({"message": message} if rank0 and message else {})}
            pod["status"] = {
                "phase": "Succeeded" if code == 0 else "Failed",
                "containerStatuses": [{"name": "worker", "state": {"terminated": term}}],
            }

    def gone(self) -> None:
        self.pods = {n: p for n, p in self.pods.items() if not p["metadata"].get("deletionTimestamp")}

    def with_annotation(self, key: str, value: str) -> None:
        meta = self.job.metadata.model_copy(update={"annotations": {key: value}})
        self.job = self.job.model_copy(update={"metadata": meta})

    def rank0_request(self) -> str:
        return str(self.pods["gpt-0"]["metadata"]["annotations"].get(REQUEST_ANNOTATION, ""))


# -- what rank 0 reports ------------------------------------------------------------------------


def test_trainer_progress_line_is_what_the_operator_parses() -> None:
    line = TrainerProgress(checkpoint_step=120, checkpoint_time=1767225600.0, resumed_from_step=100,
                           request=3).line()
    log_tail = f"step 121 | loss 2.1\nTraceback (most recent call last):\n{line}\nNCCL error\n"
    assert parse_progress(log_tail) == Progress(120, "2026-01-01T00:00:00Z", 100, 3)
    assert parse_progress("capstan-progress {not json\nplain text") is None
    fresh = TrainerProgress().line()
    assert parse_progress(fresh) == Progress(None, None, -1, 0)


def test_trainer_metrics_are_what_the_operator_scrapes() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    got = answering(request=2, step=140, resumed=100)
    after = datetime.now(UTC)
    assert got == Progress(140, got.checkpoint_time, 100, 2)
    # the commit's wall-clock time, to the second (RFC 3339, as status carries it)
    assert got.checkpoint_time is not None
    assert before <= datetime.fromisoformat(got.checkpoint_time) <= after
    before_any = answering(step=None)
    assert (before_any.checkpoint_step, before_any.resumed_from_step, before_any.request) == (None, -1, 0)
    # another trainer's metrics: no progress, and no answer to requests
    assert parse_progress_metrics("# TYPE other gauge\nother 1\n") is None


def test_trainer_reads_requests_from_the_downward_api_file(tmp_path: Any) -> None:
    path = tmp_path / "annotations"
    path.write_text('capstan.dev/spec-digest="abc"\ncapstan.dev/checkpoint-request="4:stop"\n')
    assert parse_annotations(path.read_text())[REQUEST_ANNOTATION] == "4:stop"
    watcher = RequestWatcher(path, interval=0)
    assert watcher.pending(answered=3) == (4, True)
    assert watcher.pending(answered=4) is None  # answered already
    path.write_text('capstan.dev/checkpoint-request="5:save"\n')
    assert watcher.pending(answered=4) == (5, False)
    path.write_text('capstan.dev/checkpoint-request="5:cancel"\n')
    assert watcher.pending(answered=4) is None
    assert RequestWatcher(tmp_path / "missing", interval=0).pending(0) is None


# -- status.lastCheckpoint, resumedFromStep ------------------------------------------------------


def test_running_gang_reports_last_checkpoint_and_resumed_step() -> None:
    g = Gang(job())
    g.reconcile()
    g.running()
    plan = g.reconcile(rank0=answering(step=140, resumed=100))
    st = plan.status
    assert st.last_checkpoint is not None and st.last_checkpoint.step == 140
    assert st.last_checkpoint.time is not None and st.resumed_from_step == 100
    assert plan.requeue_after is not None and plan.requeue_after <= 60  # kept fresh while it runs
    # a fresh start reports -1: nothing was resumed
    assert g.reconcile(rank0=answering(step=140, resumed=-1)).status.resumed_from_step is None


def test_termination_message_reports_the_step_and_the_next_gang_its_resume() -> None:
    g = Gang(job(checkpoint={**VOLUME, "saveBeforeStopSeconds": 0}))
    g.reconcile()
    g.running()
    g.reconcile(rank0=answering(step=100, resumed=-1))
    # preempted: rank 0 checkpointed step 130 on SIGTERM and said so as it exited
    g.exit(75, TrainerProgress(checkpoint_step=130, checkpoint_time=1767225600.0, request=0).line())
    plan = g.reconcile(T0 + timedelta(seconds=10))
    assert plan.status.phase == "Restarting" and plan.status.attempt == 1
    assert plan.status.last_checkpoint is not None and plan.status.last_checkpoint.step == 130
    assert plan.status.resumed_from_step is None  # the next gang has not said yet
    g.gone()
    g.reconcile(T0 + timedelta(seconds=11))
    g.running()
    plan = g.reconcile(T0 + timedelta(seconds=20), rank0=answering(step=130, resumed=130))
    assert plan.status.resumed_from_step == 130 and plan.status.last_checkpoint.step == 130  # type: ignore[union-attr]


def test_snapshots_record_the_step_rank_0_committed() -> None:
    tj = job(checkpoint={**VOLUME, "snapshots": {"everyMinutes": 30}, "saveBeforeStopSeconds": 0})
    g = Gang(tj)
    g.reconcile()
    g.running()
    g.exit(75, TrainerProgress(checkpoint_step=130, request=0).line())
    plan = g.reconcile(T0 + timedelta(seconds=10))
    g.gone()
    plan = plan_trainingjob(g.job, [], T0 + timedelta(seconds=11), service_exists=True, pvc_exists=True)
    _, snaps = with_snapshots(g.job, plan, [], SnapshotsSeen([], set(), True), T0 + timedelta(seconds=11))
    (restart,) = snaps.create
    assert restart["metadata"]["annotations"][ANNOTATION_STEP] == "130"
    assert [r.step for r in snaps.records] == [130]


# -- save before stop ----------------------------------------------------------------------------


def test_move_waits_for_rank_0_to_commit_then_stops() -> None:
    g = Gang(job())
    g.reconcile()
    g.running()
    why = "making room for ns/big"
    plan = g.reconcile(T0 + timedelta(seconds=5), move=why, rank0=answering(request=0, step=100))
    assert plan.delete_pods == [] and g.rank0_request() == "1:stop"
    req = plan.status.checkpoint_request
    assert req is not None and (req.id, req.reason, req.stop, req.outcome) == (1, "Moved", True, "Pending")
    assert plan.status.phase == "Running" and "checkpoint request 1" in plan.status.message
    assert plan.requeue_after is not None and plan.requeue_after <= 2
    assert "CheckpointRequested" in g.events
    # rank 0 has not answered yet: still waiting, nothing annotated twice
    plan = g.reconcile(T0 + timedelta(seconds=7), move=why, rank0=answering(request=0, step=100))
    assert plan.delete_pods == [] and plan.annotate_pods == {}
    # rank 0 committed step 117 for request 1: now the gang stops and moves
    plan = g.reconcile(T0 + timedelta(seconds=9), move=why, rank0=answering(request=1, step=117))
    assert sorted(plan.delete_pods) == ["gpt-0", "gpt-1"] and plan.status.moves == 1
    req = plan.status.checkpoint_request
    assert req is not None and (req.outcome, req.step) == ("Saved", 117)
    assert plan.status.last_checkpoint is not None and plan.status.last_checkpoint.step == 117
    assert "CheckpointSaved" in g.events


def test_a_stop_waits_no_longer_than_the_bound() -> None:
    g = Gang(job(checkpoint={**VOLUME, "saveBeforeStopSeconds": 30}))
    g.reconcile()
    g.running()
    g.reconcile(T0, move="m", rank0=answering(request=0))
    plan = g.reconcile(T0 + timedelta(seconds=29), move="m", rank0=answering(request=0))
    assert plan.delete_pods == [] and plan.requeue_after is not None and plan.requeue_after <= 1
    plan = g.reconcile(T0 + timedelta(seconds=30), move="m", rank0=None)  # not even readable now
    assert sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    assert plan.status.checkpoint_request.outcome == "TimedOut"  # type: ignore[union-attr]
    assert "CheckpointRequestTimedOut" in g.events


def test_no_wait_without_an_answering_trainer_a_volume_or_a_bound() -> None:
    cases: list[tuple[TrainingJob, Progress | None]] = [
        (job(), None),  # metrics not readable
        (job(), Progress(checkpoint_step=10)),  # a trainer that does not answer requests
        (job(checkpoint={**VOLUME, "saveBeforeStopSeconds": 0}), answering()),
        (job(checkpoint={}), answering()),  # nowhere to resume from
        (job(checkpoint={**VOLUME, "resume": "None"}), answering()),
    ]
    for tj, rank0 in cases:
        g = Gang(tj)
        g.reconcile()
        g.running()
        plan = g.reconcile(move="m", rank0=rank0)
        assert sorted(plan.delete_pods) == ["gpt-0", "gpt-1"], tj.spec.checkpoint
        assert plan.status.checkpoint_request is None and plan.annotate_pods == {}


def test_suspend_and_resize_save_first() -> None:
    for change in ({"suspend": True}, {"workers": 3}):
        g = Gang(job())
        g.reconcile()
        g.running()
        spec = g.job.spec.model_copy(update=change)
        g.job = g.job.model_copy(update={"spec": spec})
        plan = g.reconcile(T0, rank0=answering(request=4))
        assert plan.delete_pods == [] and g.rank0_request() == "5:stop", change
        reason = plan.status.checkpoint_request.reason  # type: ignore[union-attr]
        assert reason == ("Suspended" if "suspend" in change else "Resized")
        plan = g.reconcile(T0 + timedelta(seconds=3), rank0=answering(request=5, step=222))
        assert sorted(plan.delete_pods) == ["gpt-0", "gpt-1"], change
        assert plan.status.phase == ("Suspended" if "suspend" in change else "Restarting")


def test_a_stop_called_off_lets_the_trainer_go_on() -> None:
    g = Gang(job())
    g.reconcile()
    g.running()
    g.reconcile(T0, move="m", rank0=answering(request=0))
    assert g.rank0_request() == "1:stop"
    plan = g.reconcile(T0 + timedelta(seconds=3), move=None, rank0=answering(request=1))
    assert plan.delete_pods == [] and plan.status.phase == "Running"
    assert plan.status.checkpoint_request.outcome == "Cancelled"  # type: ignore[union-attr]
    assert g.rank0_request() == "1:cancel"


def test_checkpoint_now_annotation_saves_without_stopping() -> None:
    g = Gang(job())
    g.reconcile()
    g.running()
    g.with_annotation(CHECKPOINT_NOW_ANNOTATION, "before-eval")
    plan = g.reconcile(T0, rank0=answering(request=2, step=100))
    assert plan.delete_pods == [] and g.rank0_request() == "3:save"
    req = plan.status.checkpoint_request
    assert req is not None and (req.reason, req.stop, req.annotation) == ("User", False, "before-eval")
    plan = g.reconcile(T0 + timedelta(seconds=2), rank0=answering(request=3, step=104))
    req = plan.status.checkpoint_request
    assert req is not None and (req.outcome, req.step) == ("Saved", 104) and plan.delete_pods == []
    # the same value again asks nothing; a new value asks again
    g.reconcile(T0 + timedelta(seconds=4), rank0=answering(request=3, step=104))
    assert g.job.status.checkpoint_request.id == 3  # type: ignore[union-attr]
    g.with_annotation(CHECKPOINT_NOW_ANNOTATION, "again")
    g.reconcile(T0 + timedelta(seconds=6), rank0=answering(request=3, step=104))
    assert g.rank0_request() == "4:save"


def test_checkpoint_now_on_a_trainer_that_cannot_answer_says_so_once() -> None:
    g = Gang(job())
    g.reconcile()
    g.running()
    g.with_annotation(CHECKPOINT_NOW_ANNOTATION, "x")
    g.reconcile(T0, rank0=None)
    g.reconcile(T0 + timedelta(seconds=1), rank0=None)
    assert g.events.count("CheckpointRequestUnsupported") == 1
    assert g.job.status.checkpoint_request.outcome == "Cancelled"  # type: ignore[union-attr]


def test_gang_network_policy_lets_the_operator_read_rank_0s_progress() -> None:
    """With spec.networkPolicy the operator, in its own namespace, still reaches the metrics port
    (else no lastCheckpoint and no save before stop), beside the scrapers the spec names."""
    from capstan.security import operator_peer
    from capstan.training.pods import METRICS_PORT, gang_network_policy

    job = TrainingJob.model_validate(make_trainingjob("gpt").spec(networkPolicy={}).obj())
    policy = gang_network_policy(job, "ops")
    assert policy is not None
    (metrics,) = [rule for rule in policy["spec"]["ingress"] if "ports" in rule]
    assert metrics["ports"] == [{"protocol": "TCP", "port": METRICS_PORT}]
    assert operator_peer("ops") in metrics["from"] and len(metrics["from"]) == 2
