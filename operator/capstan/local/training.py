"""Run a TrainingJob on this machine: the operator's plan, executed with processes for pods."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from capstan.api.trainingjob import TERMINAL_PHASES, TrainingJob
from capstan.labels import LABEL_ATTEMPT, LABEL_RANK
from capstan.local.snapshots import take_snapshot
from capstan.local.workers import Worker, free_port, start_worker, stop_worker
from capstan.training.lifecycle import plan_trainingjob

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
        return {
            "MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PET_MASTER_PORT": str(port),
            "CAPSTAN_CHECKPOINT_DIR": str(self.checkpoint_dir),
            "CAPSTAN_EXPORT_DIR": str(self.checkpoint_dir / "export"),
            # Only rank 0 serves metrics, on a port that is free here.
            "CAPSTAN_METRICS_PORT": str(free_port()) if rank == 0 else "0",
        }

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
        self.workers[name] = start_worker(obj, self._overrides(obj), log, echo)

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
        plan = plan_trainingjob(self.job, observed, now, service_exists=True, pvc_exists=True)
        before = (self.job.status.phase, self.job.status.message)
        self.job = self.job.model_copy(update={"status": plan.status})
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
