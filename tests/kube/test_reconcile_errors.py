"""A reconcile pass that fails unexpectedly is reported on the object and retried with backoff;
the loop never dies and other objects go on. Children the API server refuses are reported in the
status, which never claims workers that do not exist."""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import kopf
import pytest
from tests.api.bodies import make_trainingjob
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import wait_for

import capstan.kube.trainingjob as tjmod
from capstan.config import OperatorConfig
from capstan.kube import activities, reconciler
from capstan.kube.client import USER_AGENT
from capstan.kube.resources import TRAININGJOBS

pytestmark = pytest.mark.timeout(120)


async def test_planner_exception_becomes_a_condition_and_other_jobs_go_on(
    env: sc.Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tjmod.plan_trainingjob
    failing = {"boom": True}

    def planner(job: Any, *args: Any, **kwargs: Any) -> Any:
        if failing.get(job.metadata.name):
            raise OverflowError("date value out of range (on purpose)")
        return real(job, *args, **kwargs)

    monkeypatch.setattr(tjmod, "plan_trainingjob", planner)
    async with env.operator():
        await env.api.create(sc.job_body(env, "boom"))
        await env.api.create(sc.job_body(env, "fine"))
        await sc.wait_pods(env, "fine", 2)  # another job's loop is not affected
        job = await sc.wait_job(
            env, "boom", lambda j: sc.condition(j, "Admitted").get("reason") == "ReconcileError", "error"
        )
        admitted = sc.condition(job, "Admitted")
        assert admitted["status"] == "False"
        assert admitted["message"] == "OverflowError: date value out of range (on purpose)"
        assert sc.status(job).get("phase", "Pending") == "Pending"
        assert await sc.pods_of(env, "boom") == []
        await sc.wait_event(env, "boom", "ReconcileError")

        # The loop is still alive: once the planner copes, the job is admitted and gets its gang.
        failing["boom"] = False
        await sc.wait_pods(env, "boom", 2)
        job = await sc.wait_job(env, "boom", sc.admitted_is("True"), "admitted again")
        assert sc.condition(job, "Admitted")["reason"] == "Valid"


class _Stopped:
    """Stands in for kopf.DaemonStopped: falsy until set."""

    def __init__(self) -> None:
        self.flag = False

    def __bool__(self) -> bool:
        return self.flag


class _FakeApi:
    """Just what the loop's error report touches: the object, its status, Events."""

    closed = False

    def __init__(self) -> None:
        self.obj: dict[str, Any] = (
            make_trainingjob("j").namespace("ns").uid("u1").generation(1).status(phase="Running").obj()
        )
        self.events: list[tuple[str, str]] = []

    async def get(self, res: Any, namespace: str, name: str) -> dict[str, Any]:
        return self.obj

    async def patch_status(self, res: Any, namespace: str, name: str, patch: dict[str, Any]) -> None:
        assert res == TRAININGJOBS
        self.obj["status"] = {**self.obj["status"], **patch}

    async def post_event(self, body: Any, reason: str, message: str, type_: str = "Normal") -> None:
        self.events.append((reason, message))


async def test_loop_survives_exceptions_backs_off_and_logs_the_traceback_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(reconciler, "ERROR_BACKOFF_S", (0.01, 0.02, 0.05))
    api, stopped = _FakeApi(), _Stopped()
    memo = kopf.Memo(api=api, wakeups={})
    calls: list[float] = []

    async def reconcile(*_: Any) -> float | None:
        calls.append(asyncio.get_running_loop().time())
        if len(calls) <= 3:
            raise KeyError("spec")
        stopped.flag = True
        reconciler.wake(memo, "u1")  # end the wait at once, as kopf's stop would
        return None

    logger = logging.getLogger("test-loop")
    with caplog.at_level(logging.WARNING, logger="test-loop"):
        await asyncio.wait_for(
            reconciler.reconcile_loop(
                "TrainingJob",
                reconcile,  # type: ignore[arg-type]
                name="j",
                namespace="ns",
                uid="u1",
                memo=memo,
                logger=logger,
                stopped=stopped,  # type: ignore[arg-type]
                condition="Admitted",
            ),
            10,
        )
    assert len(calls) == 4  # three failures, then a good pass; the loop did not die
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps[0] >= 0.01 and gaps[1] >= 0.02 and gaps[2] >= 0.05  # backoff grows
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "KeyError: 'spec'" in tracebacks[0].getMessage()
    (cond,) = api.obj["status"]["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Admitted", "False", "ReconcileError")
    assert cond["message"] == "KeyError: 'spec'"
    assert api.obj["status"]["phase"] == "Running"
    assert api.events == [("ReconcileError", "KeyError: 'spec'")]  # once, not per retry
    assert memo["wakeups"] == {}


def _operator_creates(plural: str) -> Any:
    def match(req: Any) -> bool:
        return (
            req.headers.get("User-Agent", "").startswith(USER_AGENT)
            and str(req.method.value).upper() == "POST"
            and req.resource is not None
            and req.resource.plural == plural
        )

    return match


async def test_refused_pods_show_in_status_without_a_false_created_claim(
    cluster: Cluster, env: sc.Env
) -> None:
    message = 'Pod "refused-0" is invalid: spec.containers[0].securityContext.privileged: Forbidden'
    creates = _operator_creates("pods")
    cluster.emulator.refuse(creates, 422, "Invalid", message)
    async with env.operator():
        await env.api.create(sc.job_body(env, "refused"))
        job = await sc.wait_job(
            env, "refused", lambda j: sc.condition(j, "Admitted").get("reason") == "CreateFailed", "refusal"
        )
        admitted = sc.condition(job, "Admitted")
        assert admitted["status"] == "False" and admitted["message"] == message
        st = sc.status(job)
        assert st["phase"] == "Pending" and "placement" not in st
        assert message in st["message"] and "created" not in st["message"]
        assert await sc.pods_of(env, "refused") == []
        assert "GangCreated" not in await sc.wait_event(env, "refused", "CreateFailed")

        # Retries (with backoff) leave the status as it is: no flapping between Starting and Pending.
        # (Counted as the operator's status writes: kopf's own metadata patch may land meanwhile.)
        written = _status_writes(cluster)
        await wait_for(lambda: _at_least(cluster, creates, 6), sc.TIMEOUT, what="two more create attempts")
        again = await sc.get_job(env, "refused")
        assert again is not None and sc.status(again) == st
        assert _status_writes(cluster) == written

        # Once the server accepts the pods, the job is admitted and the gang created.
        cluster.emulator.clear_faults()
        await sc.wait_pods(env, "refused", 2)
        job = await sc.wait_job(env, "refused", sc.admitted_is("True"), "admitted")
        assert sc.status(job)["phase"] == "Starting" and "refused" not in sc.status(job)["message"]
        await wait_for(lambda: _has_event(env, "refused", "GangCreated"), sc.TIMEOUT, what="GangCreated")


def _status_writes(cluster: Cluster) -> int:
    """How many status writes of TrainingJobs the operator has sent."""
    return sum(1 for r in list(cluster.emulator)
               if r.headers.get("User-Agent", "").startswith(USER_AGENT) and r.action is not None
               and r.action.value == "UPDATE" and r.resource is not None
               and r.resource.plural == "trainingjobs" and r.subresource == "status")


async def _has_event(env: sc.Env, name: str, reason: str) -> bool:
    return reason in await sc.event_reasons(env, name)


async def _at_least(cluster: Cluster, match: Any, n: int) -> bool:
    return sum(map(match, list(cluster.emulator))) >= n


@pytest.mark.parametrize(("status", "longest"), [(0, 5.0), (429, 5.0), (503, 5.0), (403, 30.0), (422, 30.0)])
def test_retries_while_the_api_server_is_away_stay_a_few_seconds_apart(status: int, longest: float) -> None:
    """An API server that is restarting (no answer, 429, 5xx) is asked again every few seconds, so
    work resumes soon after it is back; a refusal (4xx) backs off to 30 s."""
    from capstan.kube.client import ApiError

    unavailable = reconciler._unavailable(ApiError(status, "Reason", "message"))
    delays = [reconciler._backoff(n, unavailable=unavailable) for n in range(12)]
    assert delays == sorted(delays) and delays[0] == 1.0 and max(delays) == longest


def test_kopf_watches_reconnect_within_seconds_but_give_up_no_sooner_than_kopfs_default() -> None:
    settings = kopf.OperatorSettings()
    default_total = sum(settings.networking.error_backoffs)  # type: ignore[arg-type]
    activities.configure_settings(settings, OperatorConfig.from_env({}))
    backoffs = list(settings.networking.error_backoffs)  # type: ignore[arg-type]
    assert max(backoffs) <= 5.0
    assert sum(backoffs) >= default_total
