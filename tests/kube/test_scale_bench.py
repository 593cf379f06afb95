"""``bench/scale.py`` stops its operators when it is told to stop (SIGTERM or SIGINT), rather than
leaving them running against the cluster, and its cleanup runs on the way out."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path
    sys.path[:0] = [{bench!r}, {repo!r}]
    import scale
    from tests.faults.faults import OperatorProcess

    op = OperatorProcess("ns", "unused", Path("."))
    op._proc = subprocess.Popen(["sleep", "300"])  # stands for a running operator
    scale._LIVE.append(op)
    scale.install_signal_handlers()
    print(op._proc.pid, flush=True)
    try:
        os.kill(os.getpid(), signal.{sig})
        time.sleep(30)
    finally:
        print("cleanup", scale._INTERRUPTED, op._stopping.is_set(), op._proc.poll() is not None, flush=True)
    """
)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_operators_then_runs_the_cleanup(sig: str) -> None:
    code = SCRIPT.format(bench=str(REPO / "bench"), repo=str(REPO), sig=sig)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = done.stdout.split()
    assert done.returncode == 128 + getattr(signal, sig), done.stderr
    pid = int(lines[0])
    # the operator was stopped (and reaped) before the cleanup ran, and no restart is due
    assert lines[1:] == ["cleanup", "True", "True", "True"], done.stdout
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
