"""The operator process: kopf (peering, namespace scope, liveness) plus a Prometheus endpoint.

``run_operator`` is what ``capstan operator`` calls; :func:`serve` is the same thing as a
coroutine, so tests and benchmarks run the real operator inside their own event loop.

When kopf itself fails — e.g. an answer to one of its own requests is cut short: kopf retries
failed requests but not a body that breaks off or is not whole JSON, and none of its settings
changes that — kopf stops all its tasks and re-raises. ``capstan operator`` then logs one line
saying so and exits with status 1, so that Kubernetes restarts the container; it never lingers
half-alive. Should kopf's shutdown itself get stuck (watch streams left waiting for credentials),
the process exits with status 1 :data:`STUCK_EXIT_S` after kopf's cleanup, saying so; kopf's own
last resort SIGKILLs it after :data:`EXIT_TIMEOUT_S`. (Capstan's own API client retries such answers: see
``ApiClient.request``.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from capstan.config import ConfigError, OperatorConfig
from capstan.kube.diagnostics import install_task_dump
from capstan.metrics import REGISTRY

log = logging.getLogger(__name__)

#: Exit status of ``capstan operator`` when kopf stopped on an error (Kubernetes restarts it).
EXIT_FAILED = 1
#: Seconds ``capstan operator`` gives kopf to stop, from the moment it begins to (a signal, or a
#: failure of its own), before kopf's last resort SIGKILLs the process. kopf's own default is 10
#: minutes: a kopf that failed while some of its requests were retrying could wait that long for
#: credentials no one would fetch any more, doing nothing (seen under API faults, see
#: tests/faults/test_faults.py). A normal stop takes a few seconds (daemons 5 s, then kopf's 5 s for
#: stray tasks).
EXIT_TIMEOUT_S = 30.0
#: Seconds after kopf's cleanup activity at which ``capstan operator`` exits with status 1 if kopf
#: has not finished stopping (see :func:`capstan.kube.activities.exit_stuck`); a normal stop ends
#: within about 6 s of it. Shorter than :data:`EXIT_TIMEOUT_S`, so the exit says why, with status 1.
STUCK_EXIT_S = 12.0
#: Handler modules, imported (so they register with kopf) when present in this install.
HANDLER_MODULES = ("capstan.kube.trainingjob", "capstan.kube.modelserving", "capstan.admission")


def load_handlers() -> list[str]:
    """Import every available handler module; returns the names imported."""
    loaded = []
    for name in HANDLER_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(name)
            loaded.append(name)
    return loaded


async def start_metrics_server(port: int, host: str = "0.0.0.0") -> web.AppRunner:
    """Serve ``capstan.metrics.REGISTRY`` at ``http://host:port/metrics`` on this event loop."""

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve(
    namespaces: Sequence[str] = (),
    clusterwide: bool = False,
    peering: str | None = None,
    standalone: bool = False,
    metrics_port: int | None = 9090,
    liveness_port: int | None = 8080,
    *,
    connection: kopf.ConnectionInfo | None = None,
    stop_flag: Any = None,
    ready_flag: Any = None,
    concurrency: int | None = None,
    exit_timeout_s: float | None = None,
    stuck_exit_s: float | None = None,
    config: OperatorConfig | None = None,
) -> None:
    """Run the operator until ``stop_flag`` (or a signal in the main thread).

    ``config`` is the operator's configuration; by default it is read from the environment here,
    once, so that a bad value stops the operator before kopf starts (:class:`ConfigError`).

    ``connection`` overrides the credentials (tests: an emulator's URL); by default they come from
    the in-cluster service account or the kubeconfig. Without ``namespaces`` the operator is
    cluster-wide. ``peering`` names the KopfPeering used for HA (active/standby by priority);
    ``standalone`` disables peering. ``exit_timeout_s`` bounds kopf's shutdown when it was not
    asked for through ``stop_flag`` (kopf then SIGKILLs the process; None: kopf's 10 minutes);
    ``stuck_exit_s`` (a process of its own only: it ends the process) exits with status 1 when kopf
    has not stopped that long after its cleanup.
    """
    config = OperatorConfig.from_env() if config is None else config
    loaded = load_handlers()
    clusterwide = clusterwide or not namespaces
    log.info("handlers: %s; scope: %s", ", ".join(loaded), "cluster" if clusterwide else ",".join(namespaces))
    memo = kopf.Memo(connection=connection, concurrency=concurrency, exit_timeout_s=exit_timeout_s,
                     stuck_exit_s=stuck_exit_s, config=config)
    runner = await start_metrics_server(metrics_port) if metrics_port else None
    install_task_dump(asyncio.get_running_loop())  # kill -USR1: where every coroutine waits
    kwargs: dict[str, Any] = {}
    if peering:
        kwargs["peering_name"] = peering
    # kopf gets an asyncio.Event that follows ``stop_flag``: kopf waits for a threading.Event in a
    # thread it cannot cancel, so a kopf that fails on its own would wait for the flag for ever.
    stop = asyncio.Event()
    follower = asyncio.create_task(_follow(stop_flag, stop)) if stop_flag is not None else None
    try:
        await kopf.operator(
            clusterwide=clusterwide,
            namespaces=[] if clusterwide else list(namespaces),
            standalone=standalone,
            liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz" if liveness_port else None,
            memo=memo,
            stop_flag=stop,
            ready_flag=ready_flag,
            **kwargs,
        )
    finally:
        if follower is not None:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
        if runner is not None:
            await runner.cleanup()


async def _follow(flag: Any, event: asyncio.Event, interval: float = 0.1) -> None:
    """Set ``event`` once ``flag`` (any flag kopf accepts: futures and events) is set."""
    future = isinstance(flag, (asyncio.Future, concurrent.futures.Future))
    while not (flag.done() if future else flag.is_set()):
        await asyncio.sleep(interval)
    event.set()


def run_operator(
    namespaces: list[str],
    clusterwide: bool,
    peering: str | None,
    standalone: bool,
    metrics_port: int,
    liveness_port: int,
) -> None:
    """Blocking entry of ``capstan operator``: the configuration from the environment, logging,
    then :func:`serve` until SIGINT/SIGTERM.

    Logs are JSON unless ``CAPSTAN_LOG_FORMAT`` is ``plain`` or ``full``; ``CAPSTAN_LOG_LEVEL``
    (``debug``) turns on debug logs. A variable with a value the operator cannot use stops it here,
    with status 1 and a line naming the variable.
    """
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        print(f"capstan operator: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_FAILED) from exc
    fmt = {
        "json": kopf.LogFormat.JSON,
        "plain": kopf.LogFormat.PLAIN,
        "full": kopf.LogFormat.FULL,
    }[config.log_format]
    kopf.configure(debug=config.debug, verbose=config.debug, log_format=fmt)
    try:
        asyncio.run(
            serve(
                namespaces=namespaces,
                clusterwide=clusterwide,
                peering=peering,
                standalone=standalone,
                metrics_port=metrics_port or None,
                liveness_port=liveness_port or None,
                exit_timeout_s=EXIT_TIMEOUT_S,
                stuck_exit_s=STUCK_EXIT_S,
                config=config,
            )
        )
    except Exception as exc:
        log.critical(
            "operator stopped by an unexpected error: %s: %s; exiting with status 1 so that "
            "Kubernetes restarts it",
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        raise SystemExit(EXIT_FAILED) from exc
