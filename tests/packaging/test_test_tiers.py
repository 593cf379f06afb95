"""The Makefile's test tiers (`make test-unit` … `make test-e2e`) together cover every test folder."""

from __future__ import annotations

import re

from capstan_pkg import ROOT

TIERS = ("UNIT_TESTS", "INTEGRATION_TESTS", "PACKAGING_TESTS", "SLOW_TESTS", "E2E_TESTS", "FAULT_TESTS")


def _tiers() -> dict[str, list[str]]:
    text = (ROOT / "Makefile").read_text()
    return {name: re.search(rf"^{name} := (.*)$", text, re.M).group(1).split() for name in TIERS}  # type: ignore[union-attr]


def test_every_test_folder_is_in_exactly_one_tier() -> None:
    folders = sorted({str(p.parent.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")})
    listed = [f for folders_of_tier in _tiers().values() for f in folders_of_tier]
    assert sorted(listed) == folders


def test_slow_tier_folders_are_marked_slow() -> None:
    # tests/conftest.py marks every test in these folders `slow`, which `make test-slow` selects.
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    marked = re.search(r"^SLOW_FOLDERS = \((.*)\)$", conftest, re.M)
    assert marked is not None
    assert [f"tests/{f}" for f in re.findall(r'"(\w+)"', marked.group(1))] == _tiers()["SLOW_TESTS"]
