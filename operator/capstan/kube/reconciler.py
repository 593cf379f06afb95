"""One object's reconcile loop (:func:`reconcile_loop`): a pass, then sleep until its requeue or a
:func:`wake`; failures back off and are reported on the object, never ending the loop.

Every handler module runs its objects through this loop; the wake-up events live in the
operator's ``memo.wakeups`` (see :mod:`capstan.kube.activities`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import kopf

from capstan import GROUP, VERSION
from capstan.api.condition_types import ConditionType, Reason
from capstan.fields import dig
from capstan.kube.client import ApiClient, ApiError
from capstan.kube.resources import ApiResource, api_resource_of
from capstan.kube.status import report_error


def wake(memo: kopf.Memo, uid: str | None) -> None:
    """Make the reconcile loop of the object with ``uid`` run now (no-op if it has none)."""
    if uid:
        event = dig(memo, "wakeups", uid)
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
# After a wake-up, how long a loop lets more events arrive before its pass: a gang's pods change
# within moments of each other (bound, then running), and one pass that sees them all writes one
# status instead of one per pod.
COALESCE_S = 0.2
ERROR_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
#: Backoff while the API server cannot be reached or answers 429/5xx: it is away, not refusing,
#: so the loop keeps asking every few seconds and resumes within that after it is back.
UNAVAILABLE_BACKOFF_S = (1.0, 2.0, 3.0, 5.0)
#: Longest exception message written into a condition (the rest is in the operator's log).
ERROR_MESSAGE_MAX = 1024
Reconcile = Callable[[ApiClient, str, str, str, kopf.Memo, kopf.Logger], Awaitable[float | None]]


async def reconcile_loop(
    kind: str,
    reconcile: Reconcile,
    *,
    name: str,
    namespace: str,
    uid: str,
    memo: kopf.Memo,
    logger: kopf.Logger,
    stopped: kopf.DaemonStopped,
    condition: str = ConditionType.READY,
) -> None:
    """Run ``reconcile`` for one object until the daemon stops: after each pass sleep until its
    requested requeue (at most :data:`RESYNC_S`) or until :func:`wake` is called for ``uid`` (then
    :data:`COALESCE_S` more, so that events arriving together make one pass).

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
    res = api_resource_of({"apiVersion": f"{GROUP}/{VERSION}", "kind": kind})
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
                await asyncio.sleep(COALESCE_S)  # woken by an event: let its siblings arrive
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
    res: ApiResource,
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
