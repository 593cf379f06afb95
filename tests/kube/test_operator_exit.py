"""``capstan operator`` never lingers in a shutdown kopf cannot finish (found by the API-fault tests
of tests/faults/test_faults.py: a kopf that stopped on a cut answer while other requests of its own
were retrying waited for credentials no one would fetch any more, for up to kopf's 10 minutes).

kopf's last resort SIGKILLs the process once its shutdown has run for
``settings.process.ultimate_exiting_timeout``; ``capstan operator`` sets that to
``EXIT_TIMEOUT_S``. Here a cleanup handler that never returns stands in for the stuck shutdown.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml
from tests.kube.conftest import Cluster

pytestmark = pytest.mark.timeout(120)

STUCK_OPERATOR = """
import asyncio, sys
import kopf
import capstan.kube.operator as op
op.EXIT_TIMEOUT_S = 2.0

@kopf.on.cleanup(id="never-returns")
async def never_returns(**_):
    await asyncio.sleep(3600)

from capstan.cli import main
sys.exit(main(["operator", "--standalone", "--metrics-port", "0", "--liveness-port", "0"]))
"""


async def test_a_shutdown_kopf_cannot_finish_ends_by_sigkill_after_the_exit_timeout(
    cluster: Cluster, tmp_path: Path
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "emu", "cluster": {"server": cluster.url}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "emu", "user": "u"}}],
        "current-context": "c",
    }))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", STUCK_OPERATOR,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "CAPSTAN_LOG_FORMAT": "plain"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    out = b""
    try:
        while b"capstan operator started" not in out:
            out += await asyncio.wait_for(proc.stdout.readline(), 60)
        proc.send_signal(signal.SIGTERM)
        stopping = time.monotonic()
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)  # kopf's default would be 600 s
        took = time.monotonic() - stopping
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = (out + rest).decode()
    assert proc.returncode == -signal.SIGKILL, text[-3000:]
    assert 2.0 <= took < 15, took
    assert "Signal SIGTERM is received" in text
