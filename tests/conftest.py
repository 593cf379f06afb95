"""Fixtures shared by every test folder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

K8S_VERSION = "1.33.0"


def validate_k8s(obj: dict[str, Any]) -> None:
    """Validate a built-in Kubernetes object against the official schema (strict: no unknown fields)."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


@pytest.fixture
def k8s_valid() -> Callable[[dict[str, Any]], None]:
    """A function that fails the test when an object is not valid for Kubernetes 1.33."""
    return validate_k8s
