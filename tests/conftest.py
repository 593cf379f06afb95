"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

K8S_VERSION = "1.33.0"
# Folders whose tests run real training or serving processes: all of them count as `slow`
# (`make test-slow`), whether or not each test says so.
SLOW_FOLDERS = ("local", "workloads")
_TESTS = Path(__file__).resolve().parent


def validate_k8s(obj: dict[str, Any]) -> None:
    """Validate a built-in Kubernetes object against the official schema (strict: no unknown fields)."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture
def k8s_valid() -> Callable[[dict[str, Any]], None]:
    """A function that fails the test when an object is not valid for Kubernetes 1.33."""
    return validate_k8s


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under ``SLOW_FOLDERS`` as ``slow``."""
    for item in items:
        path = item.path.resolve()
        if path.is_relative_to(_TESTS) and path.relative_to(_TESTS).parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
