"""Rollouts on a full cluster that borrow GPUs from preemptible TrainingJobs (rollout.borrow)."""

from __future__ import annotations

from typing import Any

from sim import at, make_ms
from tests.api.bodies import make_trainingjob

from capstan.kube.placement import placed_without_pods
from capstan.serving.borrow import Lender, lender_of, plan_borrow, unschedulable_gpus
from capstan.serving.plan import Observed, plan_modelserving


def lender(
    name: str,
    gpus: int,
    priority: int = 0,
    phase: str = "Running",
    lent_to: str = "",
    preemptible: bool = True,
) -> Lender:
    return Lender(name, gpus, priority, phase, lent_to, preemptible)


def tj(
    name: str,
    gpus: int = 8,
    *,
    priority: int = 0,
    phase: str = "Running",
    lent_to: str = "",
    preemptible: bool = True,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ml", "resourceVersion": "7"}
    if lent_to:
        meta["annotations"] = {"capstan.dev/lent-to": lent_to}
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": meta,
        "spec": {"workers": 1, "gpusPerWorker": gpus, "priority": priority, "preemptible": preemptible},
        "status": {"phase": phase},
    }


def stuck_pod(gpus: int) -> dict[str, Any]:
    return {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "server", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        },
    }


def test_lowest_priority_then_smallest_lenders_cover_what_is_short() -> None:
    jobs = [
        lender("big-low", 16, priority=-5),
        lender("small-low", 4, priority=-5),
        lender("small-high", 4, priority=10),
        lender("other", 8, preemptible=False),
        lender("queued", 8, phase="Queued"),
        lender("theirs", 8, lent_to="someone-else"),
    ]
    bp = plan_borrow("llm", allowed=True, rolling_out=True, short=8, canary_gpus=16, lenders=jobs)
    # small-low (4) then big-low (16) would go past the canary's 16; the next lowest is small-high
    assert bp.lend == ["small-low", "small-high"] and bp.active
    assert bp.borrowed == ["small-high", "small-low"]
    assert bp.message == "borrowing 8 GPUs from TrainingJobs small-high, small-low until the rollout ends"


def test_loans_in_flight_count_and_nothing_more_is_taken() -> None:
    stopping = [lender("a", 8, lent_to="llm"), lender("b", 8)]
    bp = plan_borrow("llm", allowed=True, rolling_out=True, short=8, canary_gpus=16, lenders=stopping)
    assert bp.lend == [] and bp.borrowed == ["a"]  # a is still stopping: its 8 GPUs are on the way
    stopped = [lender("a", 8, phase="Lent", lent_to="llm"), lender("b", 8)]
    bp = plan_borrow("llm", allowed=True, rolling_out=True, short=0, canary_gpus=16, lenders=stopped)
    assert bp.lend == [] and bp.give_back == [] and bp.active  # kept while the rollout lasts


def test_loans_end_with_the_rollout_or_when_borrowing_is_turned_off() -> None:
    jobs = [lender("a", 8, phase="Lent", lent_to="llm"), lender("c", 8, phase="Lent", lent_to="other")]
    for allowed, rolling in ((True, False), (False, True)):
        bp = plan_borrow("llm", allowed=allowed, rolling_out=rolling, short=8, canary_gpus=8, lenders=jobs)
        assert bp.give_back == ["a"] and bp.lend == [] and not bp.active
        assert bp.message == "returned the GPUs of a: the rollout ended"


def test_nothing_to_borrow_says_so() -> None:
    bp = plan_borrow(
        "llm",
        allowed=True,
        rolling_out=True,
        short=8,
        canary_gpus=8,
        lenders=[lender("x", 8, preemptible=False)],
    )
    assert bp.reason == "NothingToBorrow" and "lack 8 GPUs" in bp.message and not bp.lend


def test_unschedulable_gpus_counts_only_pods_the_scheduler_refused() -> None:
    bound = {**stuck_pod(4), "spec": {**stuck_pod(4)["spec"], "nodeName": "n1"}}
    assert unschedulable_gpus([stuck_pod(8), stuck_pod(2), bound]) == 10
    assert lender_of(tj("a", 8, lent_to="llm")) == Lender("a", 8, 0, "Running", "llm", True)


def test_a_rollout_borrows_then_returns_when_promoted() -> None:
    spec = {
        "gpu": True,
        "tensorParallel": 8,
        "replicas": 2,
        "rollout": {"steps": [{"weight": 50}], "maxSurge": 0, "borrow": "PreemptibleJobs"},
    }
    ms = make_ms(**spec)
    first = plan_modelserving(ms, Observed(), at(0))
    stable = first.status.stable_revision
    dep = next(o for o in first.objects if o["kind"] == "Deployment")
    dep["status"] = {"readyReplicas": 2}
    ms = ms.model_copy(update={"status": first.status})
    new = make_ms(generation=2, **{**spec, "env": [{"name": "V", "value": "2"}]})
    new = new.model_copy(update={"status": ms.status})
    plan = plan_modelserving(new, Observed(deployments=[dep]), at(10))
    canary = plan.status.canary_revision
    assert canary and canary != stable
    new = new.model_copy(update={"status": plan.status})
    jobs = [
        tj("train-low", 8, priority=-1),
        tj("train-high", 8, priority=5),
        tj("fixed", 8, preemptible=False),
    ]
    seen = Observed(deployments=[dep], canary_pods=[stuck_pod(8)], lenders=jobs)
    plan = plan_modelserving(new, seen, at(20))
    assert plan.lend == ["train-low"] and plan.status.borrowed_from == ["train-low"]
    cond = next(c for c in plan.status.conditions if c.type == "Borrowing")
    assert (cond.status, cond.reason) == ("True", "Borrowing")
    assert any(e.reason == "Borrowing" and "train-low" in e.message for e in plan.events)
    # once lent, the job is not asked again; the rollout ends (rolled back here: the spec reverts)
    new = new.model_copy(update={"status": plan.status})
    jobs[0] = tj("train-low", 8, priority=-1, phase="Lent", lent_to="gpt")
    reverted = make_ms(generation=3, **spec).model_copy(update={"status": plan.status})
    plan = plan_modelserving(reverted, Observed(deployments=[dep], lenders=jobs), at(30))
    assert plan.status.canary_revision is None
    assert plan.give_back == ["train-low"] and plan.lend == [] and plan.status.borrowed_from == []
    cond = next(c for c in plan.status.conditions if c.type == "Borrowing")
    assert (cond.status, cond.reason) == ("False", "NotNeeded")


def test_a_lent_gang_keeps_its_claim_from_other_gangs() -> None:
    body = (
        make_trainingjob("t")
        .namespace("ml")
        .uid("u")
        .workers(2)
        .gpus(4)
        .spec(preemptible=True, checkpoint={"volume": {"size": "1Gi"}})
        .obj()
    )
    body["status"] = {"phase": "Lent", "placement": {"nodes": ["n1", "n2"]}}
    assert placed_without_pods([body], []) == {"ml/t": {"n1": 4, "n2": 4}}
    body["status"]["phase"] = "Pending"  # given back: the queue places it afresh
    assert placed_without_pods([body], []) == {}


def test_loans_are_read_as_long_as_the_modelserving_ever_borrowed() -> None:
    import asyncio

    from capstan.api.conditions import set_condition
    from capstan.kube.modelserving import _borrow_view

    class Lister:
        def __init__(self) -> None:
            self.asked: list[str] = []

        async def list_objects(self, res: Any, namespace: str | None = None, *_: Any) -> list[dict[str, Any]]:
            self.asked.append(res.kind)
            return [tj("a", phase="Lent", lent_to="gpt")]

        async def list_pods(self, namespace: str, labels: Any) -> list[dict[str, Any]]:
            self.asked.append("Pod")
            return []

    never = make_ms(gpu=True)
    api: Any = Lister()
    assert asyncio.run(_borrow_view(api, never)) == ([], []) and api.asked == []
    # borrowing turned off after a loan whose return did not land: the job is still read, so the
    # next pass gives it back
    st = never.status.model_copy(
        update={
            "conditions": set_condition(
                [], "Borrowing", "False", "NotNeeded", "returned", now=at(0), generation=1
            )
        }
    )
    after = never.model_copy(update={"status": st})
    pods, lenders = asyncio.run(_borrow_view(api, after))
    assert pods == []  # no rollout asks for GPUs: the canary is not read
    assert [x["metadata"]["name"] for x in lenders] == ["a"] and api.asked == ["TrainingJob"]
    plan = plan_modelserving(after, Observed(lenders=lenders), at(10))
    assert plan.give_back == ["a"]
