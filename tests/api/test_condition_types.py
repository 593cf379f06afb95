"""Condition types and reasons: the enums keep their wire values, and docs/conditions.md is current."""

from __future__ import annotations

from pathlib import Path

from capstan.api.condition_types import REASONS, ConditionType, markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "conditions.md"


def test_docs_conditions_md_is_generated_from_the_enums() -> None:
    assert DOC.read_text() == markdown(), (
        "docs/conditions.md is stale: run `make crds` "
        "(or python -m capstan.api.condition_types docs/conditions.md)"
    )


def test_every_type_and_reason_is_documented_and_unique_in_its_class() -> None:
    for cls in (ConditionType, *REASONS):
        values = [m.value for m in cls]
        assert len(values) == len(set(values)), cls.__name__
        for m in cls:
            assert m.doc, f"{cls.__name__}.{m.name} has no description"
            assert m.value.isidentifier() and m.value[0].isupper(), m.value  # CamelCase, as Kubernetes'
            assert m == m.value and f"{m}" == m.value  # the wire value, wherever it is written
