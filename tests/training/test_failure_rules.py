"""failurePolicy.rules and the defaults, as a user sees them: the verdict, the counters, the status."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.training.test_lifecycle import T0, Cluster, job

from capstan.admission.validation import validate
from capstan.api.loading import InvalidObject, parse_object
from capstan.api.trainingjob import FailurePolicy
from capstan.cli import main
from capstan.training.failure_rules import Failure, blame_node, first_failure, judge, pod_reasons


def policy(**kw: Any) -> FailurePolicy:
    return FailurePolicy.model_validate(kw)


def failed_pod(
    c: Cluster,
    name: str,
    exit_code: int | None = 1,
    reason: str = "",
    container_reason: str = "",
    message: str = "",
    node: str | None = None,
    finished: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    terminating: bool = False,
) -> None:
    """Play the kubelet: pod ``name`` failed this way."""
    status: dict[str, Any] = {"phase": "Failed"}
    if reason:
        status["reason"] = reason
    if conditions:
        status["conditions"] = conditions
    if exit_code is not None:
        term: dict[str, Any] = {"exitCode": exit_code}
        for key, value in (("reason", container_reason), ("message", message), ("finishedAt", finished)):
            if value:
                term[key] = value
        status["containerStatuses"] = [{"name": "worker", "state": {"terminated": term}}]
    pod = c.pods[name]
    if node:
        pod["spec"] = {**pod["spec"], "nodeName": node}
    if terminating:
        pod["metadata"]["deletionTimestamp"] = "t"
        status["phase"] = "Running"
    pod["status"] = status


def running(c: Cluster) -> None:
    c.reconcile()
    c.set_phase("Running")
    c.reconcile()


# -- the verdict on one failure --------------------------------------------------------------------


def test_first_matching_rule_decides_in_order() -> None:
    p = policy(
        rules=[
            {"action": "FailJob", "exitCodes": [3], "messagePattern": "config"},
            {"action": "RestartGangAndIgnoreMaxRestarts", "exitCodes": [3, 4]},
            {"action": "FailJob", "exitCodes": [4]},
        ]
    )
    assert judge(p, Failure(0, 3, message="bad config key")).action == "FailJob"
    said = judge(p, Failure(0, 3, message="other"))  # rule 0 needs both criteria: rule 1 matches
    assert said.action == "RestartGangAndIgnoreMaxRestarts" and "failurePolicy.rules[1]" in said.why
    assert judge(p, Failure(0, 4)).action == "RestartGangAndIgnoreMaxRestarts"  # rule 1 comes first
    assert judge(p, Failure(0, 5)).action == "RestartGang"  # no rule: the default


def test_rules_match_the_pods_reason_and_the_termination_message() -> None:
    p = policy(
        rules=[
            {"action": "FailJob", "reasons": ["OOMKilled"]},
            {"action": "RestartGangAndIgnoreMaxRestarts", "messagePattern": r"CUDA out of memory|NaN loss"},
        ]
    )
    oom = Failure(1, 137, pod_reasons(137, "", "OOMKilled", ""))
    verdict = judge(p, oom)
    assert (verdict.action, verdict.reason) == ("FailJob", "FailureRule")
    assert "worker 1 failed with exit code 137 (OOMKilled)" in verdict.why and "rules[0]" in verdict.why
    nan = judge(p, Failure(0, 1, message="step 900: NaN loss, aborting"))
    assert (nan.action, nan.reason) == ("RestartGangAndIgnoreMaxRestarts", "RestartNotCounted")


def test_defaults_keep_the_behaviour_from_before_the_rules() -> None:
    p = policy(nonRetryableExitCodes=[2])
    assert judge(p, Failure(0, 2)).reason == "NonRetryableExitCode"
    assert judge(p, Failure(0, 1)).action == "RestartGang"
    for reasons in ({"Preempted"}, {"Evicted"}, {"Shutdown"}):
        assert judge(p, Failure(0, None, frozenset(reasons))).reason == "Preempted"
    assert pod_reasons(75, "", "Error", "") == {"Preempted"}  # exit 75: checkpointed on SIGTERM
    assert pod_reasons(None, "Preempting", "", "") == {"Preempted"}
    assert pod_reasons(143, "", "", "PreemptionByScheduler") == {"Preempted"}


@pytest.mark.parametrize(
    ("failure", "cause"),
    [
        (Failure(0, None, frozenset({"NodeLost"}), node="n1"), "NodeLost"),
        (Failure(0, None, frozenset({"NotReady"}), node="n1"), "NotReady"),
        (
            Failure(0, None, frozenset({"Evicted"}), "The node was low on resource: memory.", node="n1"),
            "NodePressure",
        ),
        (
            Failure(0, 1, message="NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", node="n1"),
            "GPUError",
        ),
        (
            Failure(0, 1, message="RuntimeError: NCCL error in: x.cpp:1, unhandled system error", node="n1"),
            "NCCLError",
        ),
    ],
)
def test_failures_of_the_node_are_blamed_on_it(failure: Failure, cause: str) -> None:
    blame = blame_node(failure)
    assert blame is not None and (blame.node, blame.cause) == ("n1", cause)
    verdict = judge(policy(), failure)
    assert (verdict.action, verdict.reason) == ("RestartGangAndIgnoreMaxRestarts", "NodeFailure")
    assert "on node n1" in verdict.why


@pytest.mark.parametrize(
    "failure",
    [
        Failure(0, 1, message="ValueError: bad batch size", node="n1"),
        Failure(0, 1, message="NCCL error: remote process exited or there was a network error", node="n1"),
        Failure(
            0, None, frozenset({"Evicted"}), "Pod ephemeral local storage usage exceeds the limit", node="n1"
        ),
        Failure(0, 1, message="Xid 79"),  # no node known: nothing to blame
    ],
)
def test_failures_of_the_job_are_not_blamed_on_the_node(failure: Failure) -> None:
    assert blame_node(failure) is None


def test_the_failure_that_came_first_is_judged() -> None:
    late = Failure(0, 1, finished_at="2026-01-01T00:00:09Z")
    early = Failure(3, 137, finished_at="2026-01-01T00:00:01Z")
    assert first_failure([late, early]) is early
    assert first_failure([Failure(2, 1), Failure(1, 1)]).rank == 1  # no times: lowest rank


# -- through the lifecycle -------------------------------------------------------------------------


def test_fail_job_rule_fails_at_once_naming_the_rule() -> None:
    c = Cluster(job(failurePolicy={"rules": [{"action": "FailJob", "reasons": ["OOMKilled"]}]}))
    running(c)
    failed_pod(c, "gpt-1", 137, container_reason="OOMKilled")
    plan = c.reconcile()
    failed = next(x for x in plan.status.conditions if x.type == "Failed")
    assert plan.status.phase == "Failed" and failed.reason == "FailureRule"
    assert "OOMKilled" in failed.message and "failurePolicy.rules[0]" in failed.message
    assert plan.delete_pods == ["gpt-0"] and plan.status.restarts == 0


def test_uncounted_rule_restarts_without_backoff_or_counting() -> None:
    c = Cluster(
        job(
            failurePolicy={
                "maxRestarts": 0,
                "backoffSeconds": 60,
                "rules": [{"action": "RestartGangAndIgnoreMaxRestarts", "exitCodes": [42]}],
            }
        )
    )
    running(c)
    failed_pod(c, "gpt-0", 42)
    plan = c.reconcile()
    assert plan.status.phase == "Restarting" and plan.status.restart_after is None
    assert (plan.status.restarts, plan.status.preemptions, plan.status.hardware_restarts) == (0, 1, 0)
    assert next(x for x in plan.status.conditions if x.type == "Running").reason == "RestartNotCounted"


def test_counted_rule_overrides_the_preemption_default() -> None:
    c = Cluster(
        job(
            failurePolicy={
                "maxRestarts": 1,
                "backoffSeconds": 0,
                "rules": [{"action": "RestartGang", "reasons": ["Evicted"]}],
            }
        )
    )
    running(c)
    failed_pod(c, "gpt-0", None, reason="Evicted")
    assert c.reconcile().status.restarts == 1


def test_uncounted_restarts_are_capped_so_endless_preemption_says_so() -> None:
    c = Cluster(job(failurePolicy={"maxUncountedRestarts": 2, "backoffSeconds": 0}))
    for n in range(3):
        running(c)
        failed_pod(c, "gpt-0", 75)
        plan = c.reconcile(T0 + timedelta(seconds=n))
        c.finish_deletes()
        c.pods.clear()
    assert plan.status.phase == "Failed" and plan.status.preemptions == 2
    failed = next(x for x in plan.status.conditions if x.type == "Failed")
    assert failed.reason == "UncountedRestartLimitExceeded" and "maxUncountedRestarts (2)" in failed.message


def test_node_failure_counts_apart_and_quarantines_the_node() -> None:
    c = Cluster(job(failurePolicy={"maxRestarts": 0, "nodeQuarantineSeconds": 600}))
    running(c)
    failed_pod(c, "gpt-1", 1, message="NVRM: Xid (PCI:0000:3b:00): 79, GPU has fallen off the bus", node="n7")
    plan = c.reconcile()
    st = plan.status
    assert st.phase == "Restarting" and (st.restarts, st.preemptions, st.hardware_restarts) == (0, 0, 1)
    assert [(e.node, e.reason, e.until) for e in st.excluded_nodes] == [
        ("n7", "GPUError", "2026-01-01T00:10:00Z")
    ]
    assert "NodeQuarantined" in c.events
    running_cond = next(x for x in st.conditions if x.type == "Running")
    assert running_cond.reason == "NodeFailure" and "n7" in running_cond.message


def test_not_ready_node_eviction_fails_the_stuck_terminating_worker() -> None:
    c = Cluster(job())
    running(c)
    taint = [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}]
    failed_pod(c, "gpt-0", None, node="n3", conditions=taint, terminating=True)
    plan = c.reconcile()
    assert plan.status.phase == "Restarting" and plan.status.hardware_restarts == 1
    assert [e.reason for e in plan.status.excluded_nodes] == ["NotReady"]
    assert plan.delete_pods == ["gpt-1"]  # the evicted one is already being deleted


def test_zero_quarantine_excludes_nothing() -> None:
    c = Cluster(job(failurePolicy={"nodeQuarantineSeconds": 0}))
    running(c)
    failed_pod(c, "gpt-0", None, reason="NodeLost", node="n1")
    plan = c.reconcile()
    assert plan.status.hardware_restarts == 1 and plan.status.excluded_nodes == []


# -- bad input -----------------------------------------------------------------------------------


def _tj(**failure_policy: Any) -> dict[str, Any]:
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "x"},
        "spec": {"image": "img", "workers": 1, "failurePolicy": failure_policy},
    }


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        (
            _tj(rules=[{"action": "Retry", "exitCodes": [1]}]),
            "spec.failurePolicy.rules[0].action",
            "RestartGang",
        ),
        (_tj(rules=[{"action": "FailJob"}]), "spec.failurePolicy.rules[0]", "at least one of exitCodes"),
        (
            _tj(rules=[{"action": "FailJob", "exitCodes": [256]}]),
            "spec.failurePolicy.rules[0].exitCodes[0]",
            "255",
        ),
        (
            _tj(rules=[{"action": "FailJob", "exitCodes": [0]}]),
            "spec.failurePolicy.rules[0].exitCodes[0]",
            "1",
        ),
        (
            _tj(rules=[{"action": "FailJob", "exitCodes": []}]),
            "spec.failurePolicy.rules[0].exitCodes",
            "at least 1",
        ),
        (
            _tj(rules=[{"action": "FailJob", "reasons": ["Bored"]}]),
            "spec.failurePolicy.rules[0].reasons[0]",
            "OOMKilled",
        ),
        (
            _tj(rules=[{"action": "FailJob", "messagePattern": "NCCL (error"}]),
            "spec.failurePolicy.rules[0].messagePattern",
            "not a valid regular expression",
        ),
        (_tj(maxUncountedRestarts=-1), "spec.failurePolicy.maxUncountedRestarts", "0"),
        (_tj(nodeQuarantineSeconds=-5), "spec.failurePolicy.nodeQuarantineSeconds", "0"),
        (_tj(maxStartupAttempts=0), "spec.failurePolicy.maxStartupAttempts", "1"),
        (
            {**_tj(), "spec": {"image": "img", "workers": 1, "startupTimeoutSeconds": -1}},
            "spec.startupTimeoutSeconds",
            "1",
        ),
    ],
)
def test_bad_rules_are_rejected_naming_the_field(body: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(body)
    assert any(line.startswith(f"{field}:") and says in line for line in err.value.errors), err.value.errors


def test_render_and_the_webhook_reject_a_bad_rule_naming_the_field(tmp_path: Path, capsys: Any) -> None:
    body = _tj(
        rules=[
            {"action": "FailJob", "messagePattern": "NCCL (error"},
            {"action": "Retry", "reasons": ["Evicted"]},
        ]
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(body))
    assert main(["render", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.failurePolicy.rules[0].messagePattern" in err and "spec.failurePolicy.rules[1].action" in err
    errors = validate(body)
    assert any(e.startswith("spec.failurePolicy.rules[0].messagePattern: ") for e in errors), errors
    assert any(e.startswith("spec.failurePolicy.rules[1].action: ") for e in errors), errors
