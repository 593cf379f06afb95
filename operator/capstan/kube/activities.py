"""Operator-wide kopf activities (settings, login, startup, cleanup) and the shared state every
handler uses.

Shared state lives in kopf's operator ``memo`` (each object's memo is a shallow copy of it, so
the objects below are shared by all handlers of one operator run):

* ``memo.config`` — the :class:`~capstan.config.OperatorConfig`, read from the environment once,
  when the operator starts (:func:`operator_config` reads it);
* ``memo.api`` — the :class:`~capstan.kube.client.ApiClient` of this event loop;
* ``memo.wakeups`` — ``{uid: asyncio.Event}``, set to make an object's reconcile loop run now
  (:mod:`capstan.kube.reconciler`);
* ``memo.training`` and ``memo.serving`` — what the handlers of each kind share, typed
  (:class:`~capstan.kube.trainingjob.TrainingState`, :class:`~capstan.kube.modelserving.ServingState`),
  created by their own startup handlers.

Handler modules import this module, so its activities register with theirs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

import kopf

from capstan import GROUP
from capstan.config import OperatorConfig
from capstan.kube.cache import ClusterCache
from capstan.kube.client import DEFAULT_CONCURRENCY, ApiClient
from capstan.kube.reconciler import wake
from capstan.labels import FINALIZER

T = TypeVar("T")

#: Kopf's retries of its own requests (watches, patches) while the API server is away: flat at
#: 5 s, so watches resume within seconds after a restart of the API server or etcd (kopf's own
#: schedule grows to 21 s gaps); about the same minute in total before kopf gives up.
WATCH_ERROR_BACKOFFS_S = (1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0)

log = logging.getLogger(__name__)


def operator_config(memo: kopf.Memo) -> OperatorConfig:
    """The operator's configuration: ``memo.config``, which :func:`capstan.kube.operator.serve`
    reads from the environment when it starts; the defaults where nothing set it (tests that call
    a handler with a memo of their own)."""
    config: OperatorConfig | None = memo.get("config")
    return config if config is not None else OperatorConfig()


def shared_state(memo: kopf.Memo, key: str, factory: Callable[[], T]) -> T:
    """What the handlers of one kind share, ``memo[key]``: made by their startup handler (objects'
    memos are shallow copies of the operator's, so every loop sees it), or here on first use where
    no operator started (tools, tests that call a handler with a memo of their own)."""
    state: T | None = memo.get(key)
    if state is None:
        state = factory()
        memo[key] = state
    return state


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    """Kopf settings Capstan relies on (idempotent).

    Handler progress (the cleanup's, while an object is deleted) goes to ``capstan.dev/*``
    annotations, never to ``status``: the status belongs to the planner, and GitOps tools must see
    no drift in fields they manage. No diff-base is kept (:mod:`capstan.kube.diffbase`): no handler
    reads one, and keeping it would copy the spec into an annotation and write each object once more.
    Kopf's own log-to-Event posting is off: handlers post their own, deduplicated Events.
    """
    from capstan.kube.diffbase import NoDiffBaseStorage

    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBaseStorage()
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
    if config.placement_cache:
        memo.cache = ClusterCache.for_client(memo.api)
        # a pass reads memory: the watch event that changed a job or its children must wake it
        memo.cache.on_change = functools.partial(wake, memo)
        memo.cache.start()
    logging.getLogger("capstan").info("capstan operator started against %s", info.server)


@kopf.on.cleanup(id="capstan-cleanup")
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    """Close the shared API client; in a ``capstan operator`` process, arm the stuck-stop exit."""
    stuck_exit_s = memo.get("stuck_exit_s")
    if stuck_exit_s is not None:
        asyncio.get_running_loop().call_later(stuck_exit_s, exit_stuck, stuck_exit_s)
    cache = memo.get("cache")
    if cache is not None:
        await cache.stop()
    api = memo.get("api")
    if api is not None:
        await api.close()


def exit_stuck(after_s: float) -> None:
    """Exit the process with status 1: kopf did not finish stopping ``after_s`` seconds after its
    cleanup.

    Seen when kopf stops on an error of its own while watch streams are retrying: their retries
    find the connection closed and wait for new credentials that kopf's stopped authenticator never
    fetches. A normal stop ends within about 6 s of the cleanup (kopf's 5 s for stray tasks).
    """
    log.critical(
        "kopf did not finish stopping %.0f s after its cleanup (watch streams left waiting for "
        "credentials); exiting with status 1 so that Kubernetes restarts it",
        after_s,
    )
    logging.shutdown()
    os._exit(1)


