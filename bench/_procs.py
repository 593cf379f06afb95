"""Process helpers shared by the benchmarks (standard library only: ``bench/gpu.py`` runs on a
machine that has torch and aiohttp but not Capstan's operator)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def stop_all(procs: Iterable[subprocess.Popen[bytes] | subprocess.Popen[str]], grace_s: float = 30) -> None:
    """SIGTERM every process at once, then wait up to ``grace_s`` for each; SIGKILL the ones left."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
