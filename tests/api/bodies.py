"""Minimal valid resource bodies for API tests: override spec fields by keyword."""

from __future__ import annotations

from typing import Any


def tj(**spec: Any) -> dict[str, Any]:
    """A TrainingJob ``gpt`` with two workers of image ``img``, plus ``spec``."""
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "gpt"},
        "spec": {"image": "img", "workers": 2, **spec},
    }


def ms(**spec: Any) -> dict[str, Any]:
    """A ModelServing ``m`` of an object-store model, plus ``spec``."""
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "ModelServing",
        "metadata": {"name": "m"},
        "spec": {"model": {"uri": "s3://b/m"}, **spec},
    }
