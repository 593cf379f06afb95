"""Operator-wide kopf activities: settings, login, and the shared state every handler uses.

Shared state lives in kopf's operator ``memo`` (each object's memo is a shallow copy of it, so
the objects below are shared by all handlers of one operator run):

* ``memo.config`` — the :class:`~capstan.config.OperatorConfig`, read from the environment once,
  when the operator starts (:func:`operator_config` reads it);
* ``memo.api`` — the :class:`~capstan.kube.apply.ApiClient` of this event loop;
* ``memo.wakeups`` — ``{uid: asyncio.Event}``, set to make an object's reconcile loop run now;
* ``memo.training`` and ``memo.serving`` — what the handlers of each kind share, typed
  (:class:`~capstan.kube.trainingjob.TrainingState`, :class:`~capstan.kube.modelserving.ServingState`),
  created by their own startup handlers.

Handler modules import this module, so its activities register with theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import kopf

from capstan import GROUP, VERSION
from capstan.api.condition_types import ConditionType, Reason
from capstan.config import OperatorConfig
from capstan.kube.apply import DEFAULT_CONCURRENCY, ApiClient, ApiError, Resource, resource_of
from capstan.kube.status import report_error

FINALIZER = f"{GROUP}/finalizer"


def operator_config(memo: kopf.Memo) -> OperatorConfig:
    """The operator's configuration: ``memo.config``, which :func:`capstan.kube.operator.serve`
    reads from the environment when it starts; the defaults where nothing set it (tests that call
    a handler with a memo of their own)."""
    config: OperatorConfig | None = memo.get("config")
    return config if config is not None else OperatorConfig()


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Kopf settings Capstan relies on (idempotent).

    Progress and diff-base go to ``capstan.dev/*`` annotations, never to ``status``: the status
    belongs to the planner, and GitOps tools must see no drift in fields they manage. The diff-base
    is a digest of the spec, not a copy (:mod:`capstan.kube.diffbase`): a copy would repeat every
    ``spec.env`` value in an annotation. Kopf's own log-to-Event posting is off: handlers post
    their own, deduplicated Events.
    """
    from capstan.kube.diffbase import DigestDiffBaseStorage

    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = DigestDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = FINALIZER
    settings.posting.enabled = False
    settings.batching.batch_window = 0.05
    settings.watching.connect_timeout = 30
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    settings.networking.error_backoffs = WATCH_ERROR_BACKOFFS_S
    settings.background.cancellation_polling = 1
    settings.peering.priority = peering_priority(config)
    settings.peering.lifetime = PEERING_LIFETIME_S


#: Seconds a replica's peering record counts as alive: a standby takes over at most this long after
#: the active replica dies without a word (SIGKILL, a lost node). Kopf refreshes the record 5-10 s
#: before it runs out; kopf's default of 60 s would leave the cluster unserved for a minute.
PEERING_LIFETIME_S = 20


def peering_priority(config: OperatorConfig) -> int:
    """This replica's peering priority: ``config.peering_priority``, else random.

    Kopf freezes every replica when the highest priority is shared, so HA replicas must differ:
    the highest one is active, the others stand by until its peering record expires.
    """
    if config.peering_priority is not None:
        return config.peering_priority
    return random.SystemRandom().randint(1, 2**31 - 1)


async def _login(
    memo: kopf.Memo, logger: kopf.Logger, settings: kopf.OperatorSettings
) -> kopf.ConnectionInfo:
    conn = memo.get("connection")
    if conn is not None:
        return conn  # type: ignore[no-any-return]
    info = await asyncio.to_thread(kopf.login_via_client, logger=logger, settings=settings)
    if info is None:
        raise kopf.LoginError("no Kubernetes credentials: neither in-cluster nor via kubeconfig")
    return info


@kopf.on.login(id="capstan-login")
async def login(
    memo: kopf.Memo, logger: kopf.Logger, settings: kopf.OperatorSettings, **_: Any
) -> kopf.ConnectionInfo:
    """Credentials for kopf: ``memo.connection`` when given (tests), else in-cluster or kubeconfig."""
    return await _login(memo, logger, settings)


@kopf.on.startup(id="capstan-startup")
async def startup(memo: kopf.Memo, logger: kopf.Logger, settings: kopf.OperatorSettings, **_: Any) -> None:
    """Apply settings and build the shared API client and handler state."""
    config: OperatorConfig | None = memo.get("config")
    if config is None:  # started by kopf itself rather than serve(): read the environment now
        config = memo.config = OperatorConfig.from_env()
    configure_settings(settings, config)
    if memo.get("exit_timeout_s") is not None:  # set by `capstan operator` (see serve())
        settings.process.ultimate_exiting_timeout = memo["exit_timeout_s"]

    async def refresh() -> kopf.ConnectionInfo:
        return await _login(memo, logger, settings)

    info = await _login(memo, logger, settings)
    concurrency = int(memo.get("concurrency") or DEFAULT_CONCURRENCY)
    memo.api = ApiClient.from_connection(info, refresh=refresh, concurrency=concurrency)
    memo.wakeups = {}
    logging.getLogger("capstan").info("capstan operator started against %s", info.server)


@kopf.on.cleanup(id="capstan-cleanup")
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Close the shared API client."""
    api = memo.get("api")
    if api is not None:
        await api.close()


def wake(memo: kopf.Memo, uid: str | None) -> None:
    """Make the reconcile loop of the object with ``uid`` run now (no-op if it has none)."""
    if uid:
        event = (memo.get("wakeups") or {}).get(uid)
        if event is not None:
            event.set()


def wake_all(memo: kopf.Memo) -> None:
    """Wake every reconcile loop (e.g. a Node vanished)."""
    for event in list((memo.get("wakeups") or {}).values()):
        event.set()


class Reported(Exception):
    """A pass failed and already said so on the object (status and Event): the reconcile loop
    only backs off."""


def refused_by_server(exc: ApiError) -> bool:
    """Whether ``exc`` is the API server refusing a write for good (invalid, forbidden, bad
    request: a 4xx) rather than a conflict (409) or throttling (429) that a retry resolves."""
    return 400 <= exc.status < 500 and exc.status not in (409, 429)


RESYNC_S = 60.0
ERROR_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
#: Backoff while the API server cannot be reached or answers 429/5xx: it is away, not refusing,
#: so the loop keeps asking every few seconds and resumes within that after it is back.
UNAVAILABLE_BACKOFF_S = (1.0, 2.0, 3.0, 5.0)
#: Kopf's retries of its own requests (watches, patches) while the API server is away: flat at
#: 5 s, so watches resume within seconds after a restart of the API server or etcd (kopf's own
#: schedule grows to 21 s gaps); about the same minute in total before kopf gives up.
WATCH_ERROR_BACKOFFS_S = (1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)
#: Longest exception message written into a condition (the rest is in the operator's log).
ERROR_MESSAGE_MAX = 1024
Reconcile = Callable[[ApiClient, str, str, str, kopf.Memo, kopf.Logger], Awaitable[float | None]]


async def reconcile_loop(
    kind: str,
    reconcile: Reconcile,
    name: str,
    namespace: str,
    uid: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    stopped: kopf.DaemonStopped,
    condition: str = ConditionType.READY,
) -> None:
    """Run ``reconcile`` for one object until the daemon stops: after each pass sleep until its
    requested requeue (at most :data:`RESYNC_S`) or until :func:`wake` is called for ``uid``.

    API errors back off (1 s … 30 s; 1 s … 5 s while the API server is away: no answer, 429 or
    5xx); client errors other than conflicts also become a Warning
    Event on the object, so ``kubectl describe`` shows why it is stuck. Any other exception (a bug,
    a value the planner cannot handle) never ends the loop: the object's ``condition`` turns
    False/ReconcileError with the exception's message, a Warning Event says the same, the
    traceback is logged once per distinct error, and the next pass waits out the backoff (wake-ups
    included, so the object's own status change does not retry it at once). A pass that has
    reported its failure on the object itself (:class:`Reported`) only backs off. Other objects
    have loops of their own and are not affected.
    """
    api: ApiClient = memo["api"]
    wakeup = memo["wakeups"].setdefault(uid, asyncio.Event())
    res = resource_of({"apiVersion": f"{GROUP}/{VERSION}", "kind": kind})
    failures = 0
    last_error = ""
    try:
        while not stopped and not api.closed:  # closed: the operator's cleanup ran, it is stopping
            wakeup.clear()
            try:
                delay = await reconcile(api, namespace, name, uid, memo, logger)
                failures, last_error = 0, ""
            except Reported as exc:
                delay = _backoff(failures)
                failures, last_error = failures + 1, ""
                logger.warning("reconcile failed (retry in %.0fs): %s", delay, exc)
                await asyncio.sleep(delay)
                continue
            except ApiError as exc:
                delay = _backoff(failures, unavailable=_unavailable(exc))
                failures += 1
                logger.warning("reconcile failed (retry in %.0fs): %s", delay, exc)
                if exc.status not in (0, 404, 409, 429) and exc.status < 500:
                    body = {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": kind,
                        "metadata": {"name": name, "namespace": namespace, "uid": uid},
                    }
                    await api.post_event(body, "ReconcileFailed", str(exc), "Warning")
            except Exception as exc:
                if api.closed:
                    break
                delay = _backoff(failures)
                failures += 1
                message = _describe(exc)
                if message != last_error:
                    logger.exception("reconcile failed (retry in %.0fs): %s", delay, message)
                else:
                    logger.warning("reconcile failed again (retry in %.0fs): %s", delay, message)
                last_error = message
                await _report_error(
                    api, res, kind, namespace, name, uid, condition=condition, message=message, logger=logger
                )
                await asyncio.sleep(delay)
                continue
            timeout = RESYNC_S if delay is None else min(max(delay, 0.0), RESYNC_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), timeout)
    finally:
        memo["wakeups"].pop(uid, None)


def _backoff(failures: int, unavailable: bool = False) -> float:
    steps = UNAVAILABLE_BACKOFF_S if unavailable else ERROR_BACKOFF_S
    return steps[min(failures, len(steps) - 1)]


def _unavailable(exc: ApiError) -> bool:
    """Whether the API server was away (no answer, 429 or 5xx) rather than refusing the request."""
    return exc.status == 0 or exc.status == 429 or exc.status >= 500


def _describe(exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= ERROR_MESSAGE_MAX else text[: ERROR_MESSAGE_MAX - 3] + "..."


async def _report_error(
    api: ApiClient,
    res: Resource,
    kind: str,
    namespace: str,
    name: str,
    uid: str,
    *,
    condition: str,
    message: str,
    logger: kopf.Logger,
) -> None:
    """Condition and Warning Event for a failed pass; best effort (the API may be what failed)."""
    try:
        changed = await report_error(
            api, res, namespace, name, uid, condition=condition, message=message, now=datetime.now(UTC)
        )
    except Exception as exc:
        logger.warning("could not report the reconcile error in the status: %s", _describe(exc))
        return
    if changed:
        body = {
            "apiVersion": res.api_version,
            "kind": kind,
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
        }
        await api.post_event(body, Reason.RECONCILE_ERROR, message, "Warning")
