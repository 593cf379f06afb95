"""The local runtime stops a worker the way a kubelet stops a pod: every process in it."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from capstan.local.workers import start_worker, stop_worker

# The worker starts a child in a session of its own, as torchrun starts its ranks, prints the
# child's PID and sleeps.
SPAWNER = (
    "import subprocess, sys, time\n"
    "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
    "print(c.pid, flush=True)\n"
    "time.sleep(600)\n"
)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stopping_a_worker_stops_the_ranks_it_started_in_their_own_sessions(tmp_path: Path) -> None:
    pod = {"spec": {"containers": [{"name": "w", "command": [sys.executable, "-c", SPAWNER]}]}}
    log = tmp_path / "w.log"
    worker = start_worker(pod, {}, log)
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(log.read_text().split()[0])
    assert _alive(child) and os.getpgid(child) != worker.proc.pid
    stop_worker(worker, grace_s=0.0)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.proc.poll() is not None
    assert not _alive(child), "a rank in its own session outlived its stopped worker"
