"""Make ``capstan_workloads`` importable from a source checkout, here and in spawned workers.

Without torch (the ``train``/``serve`` extras) every test module here is reported as skipped
rather than failing to import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_WORKLOADS = str(Path(__file__).resolve().parents[2] / "workloads")
if _WORKLOADS not in sys.path:
    sys.path.insert(0, _WORKLOADS)
# Subprocesses (torchrun workers) inherit this; harmless when the package is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_WORKLOADS, os.environ.get("PYTHONPATH")) if p)

_TORCH = importlib.util.find_spec("torch") is not None


class _WithoutTorch(pytest.File):
    """A test module that is not imported: it is skipped as a whole."""

    def collect(self) -> list[pytest.Item]:
        pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[train,serve]')")
        return []


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    """Stand in for each test module when torch is missing (the modules import it at the top)."""
    if _TORCH:
        return None
    return _WithoutTorch.from_parent(parent, path=module_path)
