"""Capstan's operator under SIGKILLs and API faults, against the real control plane of ``make cluster``.

The operator runs as a real subprocess (``capstan operator --namespace NS --standalone``), scoped
to a fresh namespace, supervised like a Deployment: an exit it did not ask for is counted and the
operator is started again. Each test drives one burst of TrainingJobs (four GPU gangs of 2-4
workers and 4-8 GPUs on the fake GPU nodes, one with a checkpoint PVC bound to a static PV, and a
CPU job) through eight steps (:func:`steps`): create a and b; create c, d and e; a worker of a
fails (exit 1); a worker of e fails; delete d; a's workers exit 0; the others' workers exit 0;
delete all.

After each step the test waits until :func:`tests.faults.faults.violations` finds nothing: exactly one
pod per rank of each live gang, no pod/Service/PVC without a live owner TrainingJob, no duplicate
Service/PVC, status consistent with the pods (phase, worker counts, attempt, restarts,
observedGeneration, conditions, placement nodes = the pods' nodes), no job lost, and after the
deletions nothing left (finalizers released, children collected).

* ``test_operator_converges_after_sigkills``: in each step the operator is SIGKILLed twice at
  seeded random moments (0-0.5 s after the step's action, while it works; then 0-1.5 s after the
  restarted operator started) and restarted at once; convergence is timed from the last restart.
* ``test_operator_converges_across_control_plane_restarts``: right after the action of three
  steps, the control plane itself goes down and comes back: etcd and kube-apiserver stopped and
  started again, then both SIGKILLed (a crash) and started again, then kube-apiserver alone
  SIGKILLed (``scripts/cluster.py restart``); the operator rides it out. A component that exits on
  its own meanwhile is started again, as its kubelet would (kube-scheduler exits when its cache
  disagrees with the API server), and the summary says so.
* ``test_operator_converges_through_api_faults``: the operator (kopf's requests and Capstan's own)
  talks to the API server through :class:`~tests.faults.faults.FaultProxy`, which answers a seeded
  share of requests with 409 (Capstan's writes), 429 + Retry-After, 500, 503, a dropped connection
  (before or after the server applied the request), a body cut half-way, a delay, and ends watch
  streams (cleanly, with a 410, or by dropping them). Once, kopf's list answer is cut on purpose:
  kopf cannot go on, the operator exits and is restarted.

Both print a summary at the end of the run and write it to ``.capstan/faults-summary.json``.
``CAPSTAN_FAULTS_SEED`` and ``CAPSTAN_FAULTS_RATE`` change the seeds and the fault rate (to explore).
Skipped when no cluster answers, unless ``CI`` or ``CAPSTAN_E2E`` (not ``0``) is set: then they fail.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.conftest import admin_client, kubeconfig_path
from tests.faults.faults import (
    KOPF_FATAL,
    LABEL_RANK,
    REQUEST_FAULTS,
    ROOT,
    Cluster,
    ControlPlaneKubelet,
    FaultProxy,
    JobSpec,
    OperatorProcess,
    Upstream,
    burst,
    is_make_cluster,
    restart_control_plane,
    static_volume,
    violations,
    wait_converged,
    write_proxy_kubeconfig,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SUMMARY_FILE = ROOT / ".capstan" / "faults-summary.json"
CRD_DIR = ROOT / "crds"
PEERING_CRDS = ROOT / "charts" / "capstan" / "crds" / "kopf.dev_peerings.yaml"
#: CRD name -> the file or folder it is applied from when missing
CRDS = {"trainingjobs.capstan.dev": CRD_DIR, "modelservings.capstan.dev": CRD_DIR,
        "kopfpeerings.kopf.dev": PEERING_CRDS}
STEP_TIMEOUT_S = 60.0
KILL_SEED = int(os.environ.get("CAPSTAN_FAULTS_SEED", "20251129"))
PROXY_SEED = int(os.environ.get("CAPSTAN_FAULTS_SEED", "7"))
KILLS_PER_STEP = 2
#: The first kill of a step comes this soon after its action, when the operator is at work (a step
#: takes it 0.1-0.5 s); later ones up to KILL_DELAY_S after the restarted operator has started.
FIRST_KILL_S = 0.5
KILL_DELAY_S = 1.5
FAULT_RATE = float(os.environ.get("CAPSTAN_FAULTS_RATE", "0.1"))
KOPF_FATAL_STEP = "fail a worker of e"  # the step after which kopf meets a fault it cannot survive
SUMMARY: dict[str, Any] = {}


class _SummaryReporter:
    """Prints the fault summary in pytest's terminal summary (end of the run)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not SUMMARY:
            return
        terminalreporter.write_sep("=", "capstan fault summary")
        for line in summary_lines(SUMMARY):
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(JSON: {SUMMARY_FILE})")


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The human-readable lines of the fault summary."""
    lines = []
    kill = summary.get("kill")
    if kill:
        times = ", ".join(f"{t['step']} {t['converged_s']:.1f}s ({t['step_s']:.1f}s)" for t in kill["trials"])
        mid = sum(t["kills_before_converged"] for t in kill["trials"])
        lines.append(f"SIGKILL: {kill['kills']} kills ({mid} before the step had converged), "
                     f"{kill['starts']} operator starts, {len(kill['unexpected_exits'])} unexpected exits")
        lines.append(f"SIGKILL: converged after the last restart (after the step's action): {times}")
    proxy = summary.get("proxy")
    if proxy:
        p = proxy["proxy"]
        faults = ", ".join(f"{k} {v}" for k, v in p["faults"].items())
        times = ", ".join(f"{t['step']} {t['converged_s']:.1f}s" for t in proxy["trials"])
        lines.append(f"API faults: {p['faults_total']} of {p['requests']} requests ({p['watches']} watches), "
                     f"rate {p['rate']}, seed {p['seed']}: {faults}")
        lines.append(f"API faults by client: {p['faults_by_client']}; operator restarts after exits: "
                     f"{proxy['restarts']} {proxy['exit_codes']}; converged: {times}")
    takeover = summary.get("takeover")
    if takeover and takeover["takeover_s"] is not None:
        lines.append(f"HA pair: a worker failed as the active replica was SIGKILLed; the standby took over "
                     f"and the gang restarted {takeover['takeover_s']:.1f}s after the kill "
                     f"(peering lifetime {takeover['lifetime_s']}s)")
    restarts = summary.get("restarts")
    if restarts:
        done = ", ".join(f"{'+'.join(r['restarted'])} {'killed' if r['killed'] else 'stopped'} at "
                         f"{r['step']!r} (back in {r['restart_s']:.1f}s, "
                         f"converged {r['converged_s']:.1f}s later)" for r in restarts["restarts"])
        lines.append(f"control plane restarts: {done}; components that exited on their own and were "
                     f"started again: {restarts['exited_on_their_own'] or 'none'}; operator exits: "
                     f"{len(restarts['unexpected_exits'])}")
    lines.append(f"invariant violations at the end: {summary.get('violations', 0)}")
    return lines


def _write_summary() -> None:
    SUMMARY["violations"] = sum(len(t["violations"]) for part in ("kill", "restarts", "takeover", "proxy")
                                if part in SUMMARY for t in SUMMARY[part]["trials"])
    SUMMARY_FILE.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY_FILE.write_text(json.dumps(SUMMARY, indent=2) + "\n")


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kube(request: pytest.FixtureRequest) -> Any:
    """An ApiClient of the test kubeconfig; skip (or fail when required) without a cluster."""
    client = admin_client()
    SUMMARY.clear()
    SUMMARY["cluster"] = client.configuration.host
    SUMMARY["started"] = datetime.now(UTC).isoformat(timespec="seconds")
    request.config.pluginmanager.register(_SummaryReporter(), f"capstan-faults-{uuid.uuid4().hex}")
    return client


@pytest.fixture(scope="module")
def crds(kube: Any) -> None:
    """Capstan's CRDs and kopf's peering CRDs in the cluster: applied server-side from crds/ (and
    the chart's kopf.dev_peerings.yaml) when absent, then Established."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    ext = client.ApiextensionsV1Api(kube)
    missing = []
    for name in CRDS:
        try:
            ext.read_custom_resource_definition(name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            missing.append(name)
    kubectl = shutil.which("kubectl") or str(ROOT / ".tools" / "bin" / "kubectl")
    for source in sorted({str(CRDS[name]) for name in missing}):
        done = subprocess.run([kubectl, "--kubeconfig", kubeconfig_path(), "apply", "--server-side",
                               "--field-manager", "capstan-tests", "-f", source],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, f"the API server refused {source}:\n{done.stderr}{done.stdout}"
    deadline = time.monotonic() + 30
    for name in CRDS:
        while True:
            crd = ext.read_custom_resource_definition(name)
            conditions = {c.type: c for c in (crd.status.conditions or [])}
            established = conditions.get("Established")
            if established is not None and established.status == "True":
                break
            assert time.monotonic() < deadline, f"CRD {name} not Established: {conditions}"
            time.sleep(0.2)


@pytest.fixture
def namespace(kube: Any, crds: None) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount); deleted afterwards."""
    from kubernetes import client

    core = client.CoreV1Api(kube)
    name = f"capstan-faults-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": name}})
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name).items:
        assert time.monotonic() < deadline, "no default ServiceAccount"
        time.sleep(0.2)
    yield name
    Cluster(kube).strip_finalizers(name)  # the operator is stopped by now
    core.delete_namespace(name)


@pytest.fixture
def cluster(kube: Any) -> Cluster:
    return Cluster(kube)


# -- the scenario --------------------------------------------------------------------------------


Disturb = Callable[[str], dict[str, Any]]


def steps(cluster: Cluster, ns: str, specs: list[JobSpec]) -> list[tuple[str, Callable[[], None]]]:
    """The workload's steps: (name, action); each action also updates what ``specs`` expect."""
    job = {s.name: s for s in specs}

    def create(*names: str) -> Callable[[], None]:
        def act() -> None:
            for name in names:
                job[name].expect = "Running"
                cluster.create_job(ns, job[name])
        return act

    def fail(name: str, rank: int) -> Callable[[], None]:
        def act() -> None:
            pods = cluster.job_pods(ns, name)
            (pod,) = [p for p in pods if p["metadata"]["labels"][LABEL_RANK] == str(rank)]
            cluster.finish_pod(ns, pod, exit_code=1)
            job[name].restarts += 1
            job[name].attempt += 1
        return act

    def succeed(*names: str) -> Callable[[], None]:
        def act() -> None:
            for name in names:
                for pod in cluster.job_pods(ns, name):
                    cluster.finish_pod(ns, pod, exit_code=0)
                job[name].expect = "Succeeded"
        return act

    def delete(*names: str) -> Callable[[], None]:
        def act() -> None:
            for name in names:
                cluster.delete_job(ns, name)
                job[name].expect = "gone"
        return act

    return [
        ("create a, b", create("gang-a", "gang-b")),
        ("create c, d, e", create("gang-c", "gang-d", "cpu-e")),
        ("fail a worker of a", fail("gang-a", 0)),
        ("fail a worker of e", fail("cpu-e", 1)),
        ("delete d", delete("gang-d")),
        ("succeed a", succeed("gang-a")),
        ("succeed b, c, e", succeed("gang-b", "gang-c", "cpu-e")),
        ("delete all", delete("gang-a", "gang-b", "gang-c", "cpu-e")),
    ]


def run_steps(cluster: Cluster, ns: str, operator: OperatorProcess, specs: list[JobSpec],
              disturb: Disturb, trials: list[dict[str, Any]], timeout: float = STEP_TIMEOUT_S) -> None:
    """Run each of :func:`steps`: its action, then ``disturb(step)`` (kills, or nothing), then wait
    until the namespace has converged. Appends one record per step to ``trials`` (``converged_s``
    from the end of the disturbance, ``step_s`` from the action); fails on a step that does not
    converge in time."""
    for spec in specs:
        spec.expect = "gone"  # created by the steps
    for step, action in steps(cluster, ns, specs):
        operator.wait_started()
        began = time.monotonic()
        action()
        extra = disturb(step)
        took, problems = wait_converged(cluster, ns, specs, timeout)
        trials.append({"step": step, "converged_s": round(took, 2),
                       "step_s": round(time.monotonic() - began, 2), "violations": problems, **extra})
        if problems:
            pytest.fail(f"step {step!r} did not converge in {timeout}s; violations:\n  "
                        + "\n  ".join(problems) + f"\noperator log tail:\n{operator.tail(40)}"
                        + f"\noperator tasks:\n{operator.task_dump()}", pytrace=False)


def test_operator_converges_after_sigkills(cluster: Cluster, kube: Any, namespace: str,
                                           tmp_path: Path) -> None:
    rng = random.Random(KILL_SEED)
    storage_class = f"{namespace}-manual"
    operator = OperatorProcess(namespace, kubeconfig_path(), tmp_path)
    specs = burst(storage_class)

    def kill_storm(step: str) -> dict[str, Any]:
        delays: list[float] = []
        interrupted: list[str] = []
        for i in range(KILLS_PER_STEP):
            if i:
                operator.wait_started()
            delay = rng.uniform(0, KILL_DELAY_S if i else FIRST_KILL_S)
            time.sleep(delay)
            operator.kill()
            delays.append(round(delay, 2))
            # did this kill interrupt unfinished work? (the operator is down: the namespace is
            # what it left, give or take the scheduler, kwok and the garbage collector)
            unfinished = violations(cluster.snapshot(namespace), specs)
            if unfinished:
                more = f" (+{len(unfinished) - 1} more)" if len(unfinished) > 1 else ""
                interrupted.append(unfinished[0] + more)
        return {"kills": len(delays), "kill_delays_s": delays, "kills_before_converged": len(interrupted),
                "interrupted": interrupted}

    trials: list[dict[str, Any]] = []
    with static_volume(kube, f"{namespace}-ckpt", storage_class):
        operator.start()
        try:
            run_steps(cluster, namespace, operator, specs, kill_storm, trials)
        finally:
            operator.stop()
            SUMMARY["kill"] = {
                "seed": KILL_SEED, "kills": operator.kills, "starts": operator.starts,
                "unexpected_exits": [(e.returncode, e.last_line) for e in operator.exits],
                "trials": trials,
            }
            _write_summary()
    assert not operator.exits, f"the operator exited on its own: {operator.exits}"


#: Control-plane restarts: after the action of the step named, (components, SIGKILL or not).
#: After an API server restart, kube-scheduler's and kube-controller-manager's watches are refused
#: (RBAC not yet loaded) and back off for up to half a minute: a step may take that long.
RESTART_STEP_TIMEOUT_S = 150.0
RESTARTS = {
    "create c, d, e": (("etcd", "kube-apiserver"), False),
    "fail a worker of a": (("etcd", "kube-apiserver"), True),
    "delete d": (("kube-apiserver",), True),
}


PEERING = "capstan-faults"


def test_standby_takes_over_when_the_active_replica_is_killed(cluster: Cluster, kube: Any, namespace: str,
                                                             tmp_path: Path) -> None:
    """Two replicas with kopf peering (as the chart runs them): the higher priority one works, the
    other stands by; SIGKILL the active one for good, fail a worker at once, and time how long the
    standby takes to notice and restart the gang."""
    from kubernetes import client

    from capstan.kube.activities import PEERING_LIFETIME_S

    peering = client.CustomObjectsApi(kube)
    peering.create_namespaced_custom_object(
        "kopf.dev", "v1", namespace, "kopfpeerings", {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                                      "metadata": {"name": PEERING, "namespace": namespace}})
    storage_class = f"{namespace}-manual"
    config = kubeconfig_path()
    active = OperatorProcess(namespace, config, tmp_path, peering=PEERING, priority=200, name="active")
    standby = OperatorProcess(namespace, config, tmp_path, peering=PEERING, priority=100, name="standby")
    specs = burst(storage_class)
    job = {s.name: s for s in specs}
    trials: list[dict[str, Any]] = []
    resumed: float | None = None
    with static_volume(kube, f"{namespace}-ckpt", storage_class):
        active.start()
        standby.start()
        try:
            active.wait_started()
            standby.wait_started()
            # Kopf starts paused and resumes only the highest priority: both are in when both
            # have a record in the peering object (and only the active one has logged a resume).
            deadline = time.monotonic() + 60
            while len(peering.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings",
                                                           PEERING).get("status") or {}) < 2:
                assert time.monotonic() < deadline, f"the replicas never met:\n{standby.tail(30)}"
                time.sleep(0.2)
            # (the standby may have run for a moment before the active one joined: then it paused)
            while active.peering_state() != "resumed" or standby.peering_state() == "resumed":
                assert time.monotonic() < deadline, (f"no active/standby pair:\n{active.tail(20)}\n---\n"
                                                     f"{standby.tail(20)}")
                time.sleep(0.2)
            for name in ("gang-a", "cpu-e"):
                job[name].expect = "Running"
                cluster.create_job(namespace, job[name])
            for spec in specs:
                if spec.name not in ("gang-a", "cpu-e"):
                    spec.expect = "gone"
            took, problems = wait_converged(cluster, namespace, specs, STEP_TIMEOUT_S)
            trials.append({"step": "create a, e (active replica)", "converged_s": round(took, 2),
                           "violations": problems})
            assert not problems, problems
            assert not standby.logged("phase Pending -> Starting"), "the standby worked while paused"
            assert standby.peering_state() != "resumed"

            killed = time.monotonic()
            active.kill(restart=False)
            pods = cluster.job_pods(namespace, "gang-a")
            (pod,) = [p for p in pods if p["metadata"]["labels"][LABEL_RANK] == "0"]
            cluster.finish_pod(namespace, pod, exit_code=1)
            job["gang-a"].restarts += 1
            job["gang-a"].attempt += 1
            took, problems = wait_converged(cluster, namespace, specs, PEERING_LIFETIME_S + STEP_TIMEOUT_S)
            resumed = time.monotonic() - killed
            trials.append({"step": "fail a worker of a (standby)", "converged_s": round(resumed, 2),
                           "violations": problems})
            assert not problems, (f"not converged after the takeover:\n{problems}\n{standby.tail(40)}\n"
                                  f"standby tasks:\n{standby.task_dump()}")
            assert standby.peering_state() == "resumed", standby.tail(40)
        finally:
            standby.stop()
            active.stop()
            SUMMARY["takeover"] = {"lifetime_s": PEERING_LIFETIME_S,
                                   "takeover_s": None if resumed is None else round(resumed, 2),
                                   "trials": trials,
                                   "unexpected_exits": [(e.returncode, e.last_line) for e in standby.exits]}
            _write_summary()
    assert resumed is not None and resumed < PEERING_LIFETIME_S + 20, f"takeover took {resumed}s"
    assert not standby.exits, standby.exits


@pytest.mark.timeout(900)
def test_operator_converges_across_control_plane_restarts(cluster: Cluster, kube: Any, namespace: str,
                                                          tmp_path: Path) -> None:
    if not is_make_cluster(kubeconfig_path()):
        pytest.skip(f"{kubeconfig_path()} is not the cluster of `make cluster`: the test restarts that one")
    storage_class = f"{namespace}-manual"
    operator = OperatorProcess(namespace, kubeconfig_path(), tmp_path)
    trials: list[dict[str, Any]] = []

    kubelet = ControlPlaneKubelet()

    def restart(step: str) -> dict[str, Any]:
        if step not in RESTARTS:
            return {}
        components, kill = RESTARTS[step]
        with kubelet.paused:
            return restart_control_plane(components, kill)

    with static_volume(kube, f"{namespace}-ckpt", storage_class), kubelet:
        operator.start()
        try:
            run_steps(cluster, namespace, operator, burst(storage_class), restart, trials,
                      timeout=RESTART_STEP_TIMEOUT_S)
        finally:
            operator.stop()
            SUMMARY["restarts"] = {
                "restarts": [t for t in trials if "restarted" in t],
                "exited_on_their_own": kubelet.restarted,
                "unexpected_exits": [(e.returncode, e.last_line) for e in operator.exits],
                "trials": trials,
            }
            _write_summary()
    assert len([t for t in trials if "restarted" in t]) == len(RESTARTS)


def test_operator_converges_through_api_faults(cluster: Cluster, kube: Any, namespace: str,
                                               tmp_path: Path) -> None:
    storage_class = f"{namespace}-manual"
    proxy = FaultProxy(Upstream.from_kubeconfig(kubeconfig_path()), rate=FAULT_RATE, seed=PROXY_SEED)
    proxy.start()
    config = tmp_path / "kubeconfig-via-proxy"
    write_proxy_kubeconfig(config, proxy.url, namespace)
    operator = OperatorProcess(namespace, str(config), tmp_path)
    trials: list[dict[str, Any]] = []

    def faults_only(step: str) -> dict[str, Any]:
        if step == KOPF_FATAL_STEP:  # kopf's next list is cut short: the operator exits 1
            proxy.arm_kopf_fatal()
            proxy.expire_watches()
        return {"faults_so_far": sum(proxy.faults.values()), "restarts_so_far": len(operator.exits)}

    try:
        with static_volume(kube, f"{namespace}-ckpt", storage_class):
            operator.start()
            try:
                run_steps(cluster, namespace, operator, burst(storage_class), faults_only, trials)
            finally:
                operator.stop()
    finally:
        proxy.stop()
        SUMMARY["proxy"] = {
            "proxy": proxy.summary(),
            "restarts": len(operator.exits),
            "exit_codes": dict(Counter(e.returncode for e in operator.exits)),
            "exit_reasons": [e.last_line[:300] for e in operator.exits],
            "trials": trials,
        }
        _write_summary()
    assert set(proxy.faults) >= set(REQUEST_FAULTS), f"fault types never injected: {proxy.summary()}"
    assert proxy.faults[KOPF_FATAL] == 1
    # exit 1: kopf stopped on an answer it cannot take; SIGKILL: kopf's shutdown did not finish
    # within capstan operator's STUCK_EXIT_S/EXIT_TIMEOUT_S. Either way the next operator converged.
    assert operator.exits and {e.returncode for e in operator.exits} <= {1, -signal.SIGKILL}, operator.exits
