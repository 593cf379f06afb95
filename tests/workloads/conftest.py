"""Make ``capstan_workloads`` importable from a source checkout, here and in spawned workers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_WORKLOADS = str(Path(__file__).resolve().parents[2] / "workloads")
if _WORKLOADS not in sys.path:
    sys.path.insert(0, _WORKLOADS)
# Subprocesses (torchrun workers) inherit this; harmless when the package is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_WORKLOADS, os.environ.get("PYTHONPATH")) if p)
