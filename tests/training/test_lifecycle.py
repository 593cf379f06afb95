"""The gang lifecycle planner, driven through the states a user sees, with no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from tests.api.bodies import make_trainingjob

from capstan.api.trainingjob import TrainingJob
from capstan.training.lifecycle import PlacementDecision, Plan, plan_trainingjob, refused

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def job(workers: int = 2, **spec: Any) -> TrainingJob:
    return make_trainingjob("gpt").uid("u1").generation(3).workers(workers).spec(**spec).model()


class Cluster:
    """A fake API server state: pods by name, driven by applying plans."""

    def __init__(self, tj: TrainingJob) -> None:
        self.job = tj
        self.pods: dict[str, dict[str, Any]] = {}
        self.events: list[str] = []

    def reconcile(
        self, now: datetime = T0, placement: PlacementDecision | None = None, move: str | None = None
    ) -> Plan:
        plan = plan_trainingjob(
            self.job, list(self.pods.values()), now, placement=placement, service_exists=True, move=move
        )
        self.job = self.job.model_copy(update={"status": plan.status})
        for obj in plan.create:
            if obj["kind"] == "Pod":
                assert obj["metadata"]["name"] not in self.pods, "duplicate pod created"
                self.pods[obj["metadata"]["name"]] = {**obj, "status": {"phase": "Pending"}}
        for name in plan.delete_pods:
            self.pods[name]["metadata"]["deletionTimestamp"] = "t"
        self.events += [e.reason for e in plan.events]
        return plan

    def set_phase(self, phase: str, exit_code: int | None = None, names: list[str] | None = None) -> None:
        for name in names or list(self.pods):
            status: dict[str, Any] = {"phase": phase}
            if exit_code is not None:
                status["containerStatuses"] = [
                    {"name": "worker", "state": {"terminated": {"exitCode": exit_code}}}
                ]
            self.pods[name]["status"] = status

    def finish_deletes(self) -> None:
        self.pods = {n: p for n, p in self.pods.items() if not p["metadata"].get("deletionTimestamp")}


def test_gang_created_whole_then_running_then_succeeded() -> None:
    c = Cluster(job(workers=3))
    plan = c.reconcile()
    assert sorted(c.pods) == ["gpt-0", "gpt-1", "gpt-2"]
    assert plan.status.phase == "Starting" and plan.status.observed_generation == 3
    c.set_phase("Running", names=["gpt-0", "gpt-1"])
    assert c.reconcile().status.phase == "Starting"  # Running only when every worker runs
    c.set_phase("Running")
    plan = c.reconcile(T0 + timedelta(seconds=5))
    assert plan.status.phase == "Running" and plan.status.start_time == "2026-01-01T00:00:05Z"
    assert plan.create == [] and plan.delete_pods == []  # idempotent: nothing more to do
    c.set_phase("Succeeded", exit_code=0)
    plan = c.reconcile(T0 + timedelta(minutes=1))
    assert plan.status.phase == "Succeeded"
    cond = {x.type: x for x in plan.status.conditions}
    assert cond["Succeeded"].status == "True" and cond["Running"].status == "False"
    assert c.events == ["GangCreated", "Running", "Succeeded"]


def test_failed_worker_restarts_whole_gang_after_backoff() -> None:
    c = Cluster(job(failurePolicy={"maxRestarts": 2, "backoffSeconds": 30}))
    c.reconcile()
    c.set_phase("Running")
    c.reconcile()
    c.set_phase("Failed", exit_code=1, names=["gpt-1"])
    plan = c.reconcile(T0 + timedelta(seconds=10))
    assert plan.status.phase == "Restarting" and plan.status.restarts == 1 and plan.status.attempt == 1
    assert sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]  # the whole gang goes, not just the failed pod
    assert "exit code 1" in plan.status.message
    # Old gang still terminating: the new one waits (same names, same DNS).
    plan = c.reconcile(T0 + timedelta(seconds=11))
    assert plan.create == [] and plan.delete_pods == []
    c.finish_deletes()
    plan = c.reconcile(T0 + timedelta(seconds=20))
    assert plan.create == [] and plan.status.phase == "Restarting"  # backoff not over
    assert plan.requeue_after is not None and 19 < plan.requeue_after <= 20
    plan = c.reconcile(T0 + timedelta(seconds=41))
    assert sorted(o["metadata"]["labels"]["capstan.dev/attempt"] for o in plan.create) == ["1", "1"]


def test_max_restarts_exhausted_fails_and_stops_workers() -> None:
    c = Cluster(job(failurePolicy={"maxRestarts": 0}))
    c.reconcile()
    c.set_phase("Running")
    c.set_phase("Failed", exit_code=137, names=["gpt-0"])
    plan = c.reconcile()
    assert plan.status.phase == "Failed"
    assert plan.delete_pods == ["gpt-1"]
    failed = next(x for x in plan.status.conditions if x.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded" and "maxRestarts (0)" in failed.message


def test_active_deadline_stops_the_gang_and_fails_the_job() -> None:
    c = Cluster(job(activeDeadlineSeconds=3600))
    c.reconcile()
    c.set_phase("Running")
    plan = c.reconcile(T0 + timedelta(seconds=10))
    assert plan.status.phase == "Running" and plan.status.start_time == "2026-01-01T00:00:10Z"
    assert plan.requeue_after == 3600  # woken at the deadline, not by a pod event
    plan = c.reconcile(T0 + timedelta(seconds=1810))
    assert plan.status.phase == "Running" and plan.requeue_after == 1800
    plan = c.reconcile(T0 + timedelta(seconds=3610))
    assert plan.status.phase == "Failed" and sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    failed = next(x for x in plan.status.conditions if x.type == "Failed")
    assert failed.reason == "DeadlineExceeded" and "activeDeadlineSeconds (3600s)" in failed.message
    assert c.reconcile(T0 + timedelta(seconds=3700)).create == []  # a failed job stays stopped


def test_active_deadline_counts_restarts_but_not_the_queue() -> None:
    c = Cluster(job(activeDeadlineSeconds=600, failurePolicy={"maxRestarts": 3, "backoffSeconds": 0}))
    c.reconcile()  # created at T0; waiting to run does not count
    c.set_phase("Running")
    c.reconcile(T0 + timedelta(seconds=500))  # startTime = T0 + 500 s
    c.set_phase("Failed", exit_code=1, names=["gpt-0"])
    assert c.reconcile(T0 + timedelta(seconds=800)).status.phase == "Restarting"
    c.finish_deletes()
    plan = c.reconcile(T0 + timedelta(seconds=1000))
    assert plan.status.phase == "Starting" and len(plan.create) == 2  # still inside the limit
    plan = c.reconcile(T0 + timedelta(seconds=1101))
    assert plan.status.phase == "Failed"


def test_move_stops_a_running_gang_and_restarts_it_where_the_placer_says() -> None:
    c = Cluster(job(activeDeadlineSeconds=3600))
    c.reconcile(placement=PlacementDecision(True, ["n0", "n0"], "nvlink", "n0"))
    # a gang still starting is not moved: the request waits for a running gang
    plan = c.reconcile(T0 + timedelta(seconds=5), move="making room for ns/big")
    assert plan.delete_pods == [] and plan.status.moves == 0
    c.set_phase("Running")
    c.reconcile(T0 + timedelta(seconds=10))  # startTime T0 + 10 s; deadline T0 + 3610 s
    plan = c.reconcile(T0 + timedelta(seconds=100), move="making room for ns/big")
    st = plan.status
    assert st.phase == "Restarting" and sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    assert (st.moves, st.restarts, st.preemptions) == (1, 0, 0)
    assert st.placement is None and st.moving_since == "2026-01-01T00:01:40Z"
    running = next(x for x in st.conditions if x.type == "Running")
    assert running.reason == "Moved" and running.message == "making room for ns/big"
    assert "restart the gang from its checkpoint" in st.message and "Moved" in c.events
    c.finish_deletes()
    plan = c.reconcile(T0 + timedelta(seconds=160),
                       placement=PlacementDecision(True, ["n1", "n1"], "nvlink", "n1"))
    assert plan.status.placement is not None and plan.status.placement.nodes == ["n1", "n1"]
    assert [o["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchFields"][0]["values"] for o in plan.create] == [["n1"], ["n1"]]
    c.set_phase("Running")
    plan = c.reconcile(T0 + timedelta(seconds=400))  # running again: 300 s of move downtime
    assert plan.status.moved_seconds == 300 and plan.status.moving_since is None
    # the deadline moves by the move's downtime: T0 + 3910 s instead of T0 + 3610 s
    assert c.reconcile(T0 + timedelta(seconds=3700)).status.phase == "Running"
    plan = c.reconcile(T0 + timedelta(seconds=3911))
    assert plan.status.phase == "Failed"
    failed = next(x for x in plan.status.conditions if x.type == "Failed")
    assert "plus 300s of moves" in failed.message


def test_deadline_waits_while_a_move_is_in_progress() -> None:
    c = Cluster(job(activeDeadlineSeconds=600))
    c.reconcile()
    c.set_phase("Running")
    c.reconcile(T0)
    c.reconcile(T0 + timedelta(seconds=500), move="relocating")
    c.finish_deletes()
    # 700 s after start, but 200 s of that is the move still in progress: not past the limit
    plan = c.reconcile(T0 + timedelta(seconds=700))
    assert plan.status.phase == "Starting" and len(plan.create) == 2


def test_preemption_exit_code_restarts_without_counting() -> None:
    c = Cluster(job(failurePolicy={"maxRestarts": 0, "backoffSeconds": 30}))
    c.reconcile()
    c.set_phase("Failed", exit_code=75, names=["gpt-0"])
    plan = c.reconcile()
    assert plan.status.phase == "Restarting"
    assert (plan.status.restarts, plan.status.preemptions) == (0, 1)
    c.finish_deletes()
    c.pods.clear()
    plan = c.reconcile()  # no backoff for preemption
    assert len(plan.create) == 2


def test_non_retryable_exit_code_fails_at_once() -> None:
    c = Cluster(job(failurePolicy={"nonRetryableExitCodes": [2]}))
    c.reconcile()
    c.set_phase("Failed", exit_code=2, names=["gpt-1"])
    plan = c.reconcile()
    assert plan.status.phase == "Failed" and plan.status.restarts == 0
    assert "nonRetryableExitCodes" in plan.status.message


def test_lost_worker_restarts_gang() -> None:
    c = Cluster(job())
    c.reconcile()
    c.set_phase("Running")
    c.reconcile()
    del c.pods["gpt-1"]  # node disappeared with the pod
    plan = c.reconcile()
    assert plan.status.phase == "Restarting" and plan.status.preemptions == 1
    assert plan.status.placement is None  # fresh placement for the next gang


def test_operator_restart_mid_creation_creates_only_missing() -> None:
    c = Cluster(job(workers=4))
    c.reconcile()
    del c.pods["gpt-2"], c.pods["gpt-3"]  # as if the operator died after two creates
    plan = c.reconcile()
    assert sorted(o["metadata"]["name"] for o in plan.create) == ["gpt-2", "gpt-3"]


def test_suspend_removes_pods_and_resume_recreates() -> None:
    c = Cluster(job())
    c.reconcile()
    c.set_phase("Running")
    c.reconcile()
    c.job = c.job.model_copy(update={"spec": c.job.spec.model_copy(update={"suspend": True})})
    plan = c.reconcile()
    assert plan.status.phase == "Suspended" and sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    c.finish_deletes()
    c.job = c.job.model_copy(update={"spec": c.job.spec.model_copy(update={"suspend": False})})
    plan = c.reconcile()
    assert len(plan.create) == 2 and plan.status.phase == "Starting"


def test_ttl_deletes_finished_job() -> None:
    c = Cluster(job(ttlSecondsAfterFinished=60))
    c.reconcile()
    c.set_phase("Succeeded", exit_code=0)
    plan = c.reconcile(T0)
    assert not plan.delete_job and plan.requeue_after == 60
    assert c.reconcile(T0 + timedelta(seconds=61)).delete_job


def test_gang_waits_for_placement_with_reason() -> None:
    c = Cluster(job(gpusPerWorker=8))
    no = PlacementDecision(
        placed=False, reason="needs 16 GPUs within one NVLink domain; the largest free has 8"
    )
    plan = c.reconcile(placement=no)
    assert plan.status.phase == "Queued" and plan.create == []
    assert "largest free has 8" in plan.status.message
    yes = PlacementDecision(placed=True, nodes=["n1", "n2"], level="nvlink", domain="clique-a")
    plan = c.reconcile(placement=yes)
    assert plan.status.placement is not None and plan.status.placement.nodes == ["n1", "n2"]
    pinned = [p["spec"]["affinity"]["nodeAffinity"] for p in plan.create if p["kind"] == "Pod"]
    assert len(pinned) == 2


def test_a_gang_the_queue_places_asks_for_placement_and_changes_nothing_until_it_gets_it() -> None:
    tj = job(gpusPerWorker=8)
    ask = plan_trainingjob(tj, [], T0, placed_by_queue=True)
    assert ask.needs_placement and ask.create == [] and ask.events == [] and ask.status == tj.status
    placed = plan_trainingjob(tj, [], T0, placement=_placed, placed_by_queue=True)
    assert not placed.needs_placement and placed.status.phase == "Starting"
    assert placed.status.placement is not None and placed.status.placement.nodes == ["n1", "n2"]
    assert [o["metadata"]["name"] for o in placed.create if o["kind"] == "Pod"] == ["gpt-0", "gpt-1"]
    # a gang that exists asks for nothing
    c = Cluster(tj)
    c.reconcile(placement=_placed)
    c.set_phase("Running")
    running = plan_trainingjob(c.job, list(c.pods.values()), T0, service_exists=True, placed_by_queue=True)
    assert not running.needs_placement and running.status.phase == "Running"


_placed = PlacementDecision(placed=True, nodes=["n1", "n2"], level="nvlink", domain="a")


def test_refused_gang_is_reported_without_claiming_workers_and_kept_while_retries_fail() -> None:
    tj = job()
    first = plan_trainingjob(tj, [], T0, placement=_placed)
    assert first.create and first.status.phase == "Starting" and first.on_created is None
    message = 'Pod "gpt-0" is invalid: spec.tolerations[0].key: Invalid value: "bad key"'
    st = refused(tj, first.status, message, T0, creating=first.creating_workers)
    admitted = next(c for c in st.conditions if c.type == "Admitted")
    assert (admitted.status, admitted.reason, admitted.message) == ("False", "CreateFailed", message)
    assert st.phase == "Pending" and st.placement is None
    assert "created" not in st.message and message in st.message
    placed = next(c for c in st.conditions if c.type == "Placed")
    assert placed.status == "False"

    # The next pass retries the creates but keeps the refusal on show, unchanged.
    tj = tj.model_copy(update={"status": st})
    retry = plan_trainingjob(tj, [], T0 + timedelta(seconds=5), placement=_placed)
    assert retry.create
    assert retry.status.wire() == st.wire()
    assert retry.on_created is not None and retry.on_created.phase == "Starting"
    ok = next(c for c in retry.on_created.conditions if c.type == "Admitted")
    assert (ok.status, ok.reason) == ("True", "Valid")
    assert retry.on_created.placement is not None and retry.on_created.placement.nodes == ["n1", "n2"]

    # A new spec (generation) is judged afresh: the old refusal no longer holds it back.
    changed = tj.model_copy(update={"metadata": tj.metadata.model_copy(update={"generation": 4})})
    fresh = plan_trainingjob(changed, [], T0, placement=_placed)
    assert fresh.on_created is None and fresh.status.phase == "Starting"
    assert next(c for c in fresh.status.conditions if c.type == "Admitted").status == "True"


def test_a_new_gang_is_counted_as_created_so_the_next_pass_writes_nothing() -> None:
    c = Cluster(job(workers=3))
    created = c.reconcile()
    assert created.creating_workers == 3 and created.status.workers.active == 3
    assert created.status.message == "3 of 3 workers not running yet"
    # the pods exist now, still pending: the status the next pass computes is the one written
    assert c.reconcile().status.wire() == created.status.wire()
    c.set_phase("Running")
    assert c.reconcile().status.phase == "Running"


def test_refusal_of_missing_workers_keeps_starting() -> None:
    c = Cluster(job(workers=2))
    c.reconcile()
    del c.pods["gpt-1"]  # one worker exists, the other is refused
    plan = plan_trainingjob(c.job, list(c.pods.values()), T0, service_exists=True)
    st = refused(c.job, plan.status, "pods \"gpt-1\" is forbidden: exceeded quota", T0)
    assert st.phase == "Starting" and st.placement == plan.status.placement


def test_a_one_worker_gang_is_created_without_a_service_and_never_gets_one() -> None:
    """One worker rendezvous on loopback: neither the gang's creation nor a pass that finds no
    Service creates one; two workers get theirs with the gang."""
    solo = plan_trainingjob(job(workers=1), [], T0, service_exists=False)
    assert [o["kind"] for o in solo.create] == ["Pod"]
    pods = [{**p, "status": {"phase": "Running"}} for p in solo.create]
    started = job(workers=1).model_copy(update={"status": solo.status})
    later = plan_trainingjob(started, pods, T0, service_exists=False)
    assert later.create == [] and later.status.phase == "Running"
    pair = plan_trainingjob(job(workers=2), [], T0, service_exists=False)
    assert [o["kind"] for o in pair.create] == ["Service", "Pod", "Pod"]


def test_a_live_gang_gets_its_missing_service_and_checkpoint_claim_again() -> None:
    """A Service or PVC create that met a namesake about to go (409, nothing created), or one
    deleted by hand, is created again while the gang lives; found by tests/faults/test_faults.py."""
    c = Cluster(job(checkpoint={"volume": {"size": "1Gi"}}))
    c.reconcile()
    c.set_phase("Running")
    pods = list(c.pods.values())
    steady = plan_trainingjob(c.job, pods, T0, service_exists=True, pvc_exists=True)
    assert steady.create == [] and steady.status.phase == "Running"
    unknown = plan_trainingjob(c.job, pods, T0)  # not looked at: nothing to conclude
    assert unknown.create == []
    plan = plan_trainingjob(c.job, pods, T0, service_exists=False, pvc_exists=False)
    assert [(o["kind"], o["metadata"]["name"]) for o in plan.create] == [
        ("PersistentVolumeClaim", "gpt-ckpt"), ("Service", "gpt-workers")]
    assert plan.status.phase == "Running" and plan.requeue_after == 2  # look again soon
    plan = plan_trainingjob(c.job, pods, T0, service_exists=False, pvc_exists=True)
    assert [o["kind"] for o in plan.create] == ["Service"]
    c.set_phase("Succeeded", exit_code=0)
    c.reconcile()
    done = plan_trainingjob(c.job, list(c.pods.values()), T0, service_exists=False, pvc_exists=False)
    assert done.create == []  # a finished job's children are not brought back


def _respec(c: Cluster, **spec: Any) -> None:
    """The user edits the spec (a new generation)."""
    new = job(**{**c.job.spec.model_dump(by_alias=True, exclude_none=True, mode="json"), **spec})
    meta = c.job.metadata.model_copy(update={"generation": c.job.metadata.generation + 1})
    c.job = new.model_copy(update={"metadata": meta, "status": c.job.status})


def _running(c: Cluster) -> None:
    c.reconcile()
    c.set_phase("Running")
    assert c.reconcile().status.phase == "Running"


def test_raising_workers_resizes_the_gang_without_counting_a_failure() -> None:
    c = Cluster(job(workers=2))
    _running(c)
    _respec(c, workers=4)
    plan = c.reconcile()
    assert plan.status.phase == "Restarting" and sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    running = {x.type: x for x in plan.status.conditions}["Running"]
    assert running.reason == "Resized" and "from 2 to 4" in running.message
    assert (plan.status.restarts, plan.status.preemptions, plan.status.attempt) == (0, 0, 1)
    assert plan.status.observed_generation == 4
    c.finish_deletes()
    c.reconcile()
    assert sorted(c.pods) == ["gpt-0", "gpt-1", "gpt-2", "gpt-3"]
    assert {p["metadata"]["labels"]["capstan.dev/attempt"] for p in c.pods.values()} == {"1"}
    env = {e["name"]: e["value"] for e in c.pods["gpt-3"]["spec"]["containers"][0]["env"]}
    assert env["NNODES"] == "4"
    c.set_phase("Running")
    assert c.reconcile().status.phase == "Running"
    assert "Resized" in c.events


def test_lowering_workers_resizes_the_gang_too() -> None:
    c = Cluster(job(workers=3))
    _running(c)
    _respec(c, workers=1)
    plan = c.reconcile()
    assert sorted(plan.delete_pods) == ["gpt-0", "gpt-1", "gpt-2"]
    assert {x.type: x for x in plan.status.conditions}["Running"].reason == "Resized"
    c.finish_deletes()
    c.reconcile()
    assert sorted(c.pods) == ["gpt-0"]


def test_a_pod_shaping_change_restarts_the_gang_with_the_new_spec() -> None:
    c = Cluster(job(workers=2))
    _running(c)
    _respec(c, image="img:2")
    plan = c.reconcile()
    assert {x.type: x for x in plan.status.conditions}["Running"].reason == "SpecChanged"
    assert (plan.status.restarts, plan.status.preemptions) == (0, 0)
    c.finish_deletes()
    c.reconcile()
    assert {p["spec"]["containers"][0]["image"] for p in c.pods.values()} == {"img:2"}


def test_live_fields_change_without_a_restart() -> None:
    c = Cluster(job(workers=2))
    _running(c)
    _respec(c, activeDeadlineSeconds=3600, failurePolicy={"maxRestarts": 9}, priority=5,
            ttlSecondsAfterFinished=60)
    plan = c.reconcile()
    assert plan.delete_pods == [] and plan.status.phase == "Running" and plan.status.attempt == 0


def test_pods_of_an_older_operator_are_not_restarted() -> None:
    c = Cluster(job(workers=2))
    c.reconcile()
    for pod in c.pods.values():  # made before pods recorded their spec
        del pod["metadata"]["labels"]["capstan.dev/workers"]
        del pod["metadata"]["annotations"]["capstan.dev/spec-digest"]
    c.set_phase("Running")
    plan = c.reconcile()
    assert plan.delete_pods == [] and plan.status.phase == "Running"


def _lend(c: Cluster, to: str | None) -> None:
    annotations = {} if to is None else {"capstan.dev/lent-to": to}
    meta = c.job.metadata.model_copy(update={"annotations": annotations})
    c.job = c.job.model_copy(update={"metadata": meta})


def test_a_preemptible_gang_lends_its_gpus_and_requeues_when_they_come_back() -> None:
    c = Cluster(job(preemptible=True, checkpoint={"volume": {"size": "1Gi"}}))
    c.reconcile()
    c.set_phase("Running")
    c.reconcile()
    _lend(c, "llm")
    plan = c.reconcile()
    assert plan.status.phase == "Lent" and sorted(plan.delete_pods) == ["gpt-0", "gpt-1"]
    lent = next(x for x in plan.status.conditions if x.type == "Lent")
    assert (lent.status, lent.reason) == ("True", "LentToRollout") and "ModelServing llm" in lent.message
    c.finish_deletes()
    assert c.reconcile().create == []  # nothing comes back while lent
    _lend(c, None)
    plan = c.reconcile()
    back = next(x for x in plan.status.conditions if x.type == "Lent")
    assert (back.status, back.reason) == ("False", "Returned")
    assert len([o for o in plan.create if o["kind"] == "Pod"]) == 2 and "Returned" in c.events


def test_only_preemptible_jobs_lend() -> None:
    c = Cluster(job())
    c.reconcile()
    c.set_phase("Running")
    c.reconcile()
    _lend(c, "llm")
    plan = c.reconcile()
    assert plan.status.phase == "Running" and plan.delete_pods == []
