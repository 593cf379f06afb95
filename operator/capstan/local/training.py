"""Run a TrainingJob on this machine: the operator's plan, executed with processes for pods."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capstan.api.trainingjob import TERMINAL_PHASES, TrainingJob
from capstan.kube.scrape import parse_progress_metrics
from capstan.labels import HOSTFILE_ANNOTATION, LABEL_ATTEMPT, LABEL_RANK
from capstan.local.snapshots import LocalSnapshot, copy_tree, list_snapshots, take_snapshot
from capstan.local.workers import Worker, free_port, start_worker, stop_worker, write_annotations
from capstan.training.lifecycle import plan_trainingjob
from capstan.training.progress import Progress

Printer = Callable[[str], None]


@dataclass
class LocalTrainingRun:
    """State of one TrainingJob on the local executor."""

    job: TrainingJob
    workdir: Path
    grace_s: float = 30.0
    echo_rank0: bool = True
    print_fn: Printer = print
    workers: dict[str, Worker] = field(default_factory=dict)
    ports: dict[int, int] = field(default_factory=dict)  # attempt -> rendezvous port
    history: list[str] = field(default_factory=list)
    metrics_ports: dict[str, int] = field(default_factory=dict)  # rank-0 pod name -> metrics port
    move: str | None = None  # a move asked of the running gang (as the placement queue asks one)

    def request_move(self, why: str) -> None:
        """Ask to move the running gang (stop it and restart it from its checkpoint)."""
        self.move = why

    @property
    def job_dir(self) -> Path:
        return self.workdir / self.job.metadata.name

    @property
    def checkpoint_dir(self) -> Path:
        return self.job_dir / "checkpoints"

    def _overrides(self, pod: dict[str, Any]) -> dict[str, str]:
        labels = pod["metadata"]["labels"]
        attempt, rank = int(labels[LABEL_ATTEMPT]), int(labels[LABEL_RANK])
        port = self.ports.setdefault(attempt, free_port())
        pod_dir = self._pod_dir(pod)
        metrics = free_port() if rank == 0 else 0
        if metrics:
            self.metrics_ports[pod["metadata"]["name"]] = metrics
        return {
            # what the kubelet gives a container: its termination-message file and downward API
            "CAPSTAN_TERMINATION_LOG": str(pod_dir / "termination-log"),
            "CAPSTAN_PODINFO_ANNOTATIONS": str(pod_dir / "annotations"),
            # the downward-API file a launcher: deepspeed pod mounts at /etc/capstan/hostfile
            "CAPSTAN_HOSTFILE": str(pod_dir / "hostfile"),
            "MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PET_MASTER_PORT": str(port),
            "CAPSTAN_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "CAPSTAN_EXPORT_DIR": str(self.checkpoint_dir / "export"),
            # Only rank 0 serves metrics, on a port that is free here.
            "CAPSTAN_METRICS_PORT": str(metrics),
        }

    def _pod_dir(self, pod: dict[str, Any]) -> Path:
        labels = pod["metadata"]["labels"]
        return self.job_dir / "pods" / f"attempt-{labels[LABEL_ATTEMPT]}" / pod["metadata"]["name"]

    def _say(self, text: str) -> None:
        self.history.append(text)
        self.print_fn(f"[capstan] trainingjob/{self.job.metadata.name}: {text}")

    def _create(self, obj: dict[str, Any]) -> None:
        if obj["kind"] != "Pod":
            return  # Services and PVCs have no local meaning: the checkpoint dir stands in for the PVC
        name = obj["metadata"]["name"]
        labels = obj["metadata"]["labels"]
        attempt, rank = labels[LABEL_ATTEMPT], labels[LABEL_RANK]
        log = self.job_dir / "logs" / f"attempt-{attempt}" / f"worker-{rank}.log"
        echo = (
            (lambda line: self.print_fn(f"  [worker-{rank}] {line}"))
            if (rank == "0" and self.echo_rank0)
            else None
        )
        overrides = self._overrides(obj)
        pod_dir = self._pod_dir(obj)
        (pod_dir / "termination-log").unlink(missing_ok=True)
        annotations = obj["metadata"].get("annotations") or {}
        write_annotations(pod_dir / "annotations", annotations)
        if HOSTFILE_ANNOTATION in annotations:
            (pod_dir / "hostfile").write_text(annotations[HOSTFILE_ANNOTATION])
        self.workers[name] = start_worker(obj, overrides, log, echo)
        self.workers[name].termination_log = pod_dir / "termination-log"

    def _annotate(self, name: str, annotations: dict[str, str]) -> None:
        """Play the API server and the kubelet: merge into the pod, refresh its downward-API file."""
        worker = self.workers.get(name)
        if worker is None:
            return
        meta = worker.pod["metadata"]
        meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        write_annotations(self._pod_dir(worker.pod) / "annotations", meta["annotations"])

    def _rank0_progress(self) -> Progress | None:
        """Scrape the current gang's rank 0 metrics, as the operator does in a cluster."""
        attempt = str(self.job.status.attempt)
        for name, worker in self.workers.items():
            labels = worker.pod["metadata"]["labels"]
            port = self.metrics_ports.get(name)
            if labels[LABEL_ATTEMPT] != attempt or not port or worker.proc.poll() is not None:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as resp:
                    return parse_progress_metrics(resp.read().decode())
            except (OSError, urllib.error.URLError, ValueError):
                return None
        return None

    def _delete(self, name: str) -> None:
        worker = self.workers.get(name)
        if worker is None:
            return
        worker.deleting = True
        stop_worker(worker, self.grace_s)
        del self.workers[name]

    def step(self, now: datetime) -> float | None:
        """Reconcile once; return seconds until the next reconcile (None when finished)."""
        observed = [w.observed() for w in self.workers.values()]
        moves = self.job.status.moves
        plan = plan_trainingjob(
            self.job, observed, now, service_exists=True, pvc_exists=True, move=self.move,
            rank0=self._rank0_progress(),
        )
        if plan.status.moves > moves:
            self.move = None  # done: the gang is stopped and restarts from its checkpoint
        before = (self.job.status.phase, self.job.status.message)
        self.job = self.job.model_copy(update={"status": plan.status})
        for event in plan.events:
            if event.reason.startswith("Checkpoint"):
                self._say(f"{event.reason}: {event.message}")
        for name, wanted in plan.annotate_pods.items():
            self._annotate(name, wanted)
        for obj in plan.create:
            self._create(obj)
        for name in plan.delete_pods:
            self._delete(name)
        if (plan.status.phase, plan.status.message) != before:
            self._say(f"{plan.status.phase} — {plan.status.message}")
        if plan.status.phase in TERMINAL_PHASES:
            return None
        return min(plan.requeue_after or 0.5, 0.5)

    def stop(self) -> None:
        """Stop every worker (used on Ctrl-C)."""
        for name in list(self.workers):
            self._delete(name)


class LocalRestoreError(RuntimeError):
    """``checkpoint.restoreFrom`` names a snapshot this machine does not have."""


def restore_snapshot(job: TrainingJob, workdir: Path, checkpoint_dir: Path) -> LocalSnapshot | None:
    """``checkpoint.restoreFrom``: seed an empty checkpoint directory from the named local snapshot of
    any job in ``workdir``, as the operator restores the checkpoint PVC from the VolumeSnapshot."""
    name = job.spec.checkpoint.restore_from
    if name is None or any(checkpoint_dir.iterdir()):
        return None  # nothing to restore, or restored already (a later run of the same job)
    roots = sorted(workdir.glob("*/snapshots"))
    found = [s for root in roots for s in list_snapshots(root) if s.name == name]
    if not found:
        have = sorted(s.name for root in workdir.glob("*/snapshots") for s in list_snapshots(root))
        raise LocalRestoreError(f"trainingjob/{job.metadata.name}: spec.checkpoint.restoreFrom: no snapshot "
                                f"{name!r} under {workdir} (have: {', '.join(have) or 'none'})")
    copy_tree(found[0].path, checkpoint_dir)
    return found[0]


def run_trainingjob(
    job: TrainingJob,
    workdir: Path,
    print_fn: Printer = print,
    timeout_s: float | None = None,
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> LocalTrainingRun:
    """Run ``job`` to completion on the local executor and snapshot its checkpoints when it succeeds."""
    run = LocalTrainingRun(job=job, workdir=workdir, print_fn=print_fn)
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    seeded = restore_snapshot(job, workdir, run.checkpoint_dir)
    if seeded is not None:
        run._say(f"checkpoint directory seeded from snapshot {seeded.name} (checkpoint.restoreFrom)")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while True:
            wait = run.step(clock())
            if wait is None:
                break
            if deadline is not None and time.monotonic() > deadline:
                run._say(f"timed out after {timeout_s:.0f}s; stopping workers")
                run.stop()
                break
            time.sleep(wait)
    except KeyboardInterrupt:
        run._say("interrupted; stopping workers")
        run.stop()
        raise
    # Give finished workers' log pumps a moment to drain.
    for worker in run.workers.values():
        if worker.pump is not None:
            worker.pump.join(timeout=5)
    if run.job.status.phase == "Succeeded":
        snap = take_snapshot(
            run.checkpoint_dir, run.job_dir / "snapshots", job.metadata.name, reason="Completion"
        )
        if snap is not None:
            run.job.status.checkpoints.append(snap.record())
            run._say(f"snapshot {snap.name} of step {snap.step} taken at {snap.path}")
    return run
