"""checkov, a Kubernetes misconfiguration scanner, over the chart and every sample's rendered objects.

One checkov run over a directory: ``chart.yaml`` (``helm template`` with default values) and one
``samples-<file>`` per ``manifests/samples`` file (``capstan render -n ml-team``, what the operator
would create). Every finding must match a skip of ``checkov-skips.yaml`` (check, where, resource
glob), and every skip must still match a finding. checkov comes from scripts/install-tools.sh (its
own venv: its pins conflict with the project's); without it the test skips, except in CI or with
CAPSTAN_E2E set, where it fails.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from capstan_pkg import ROOT, helm_template, tool

from capstan.cli import main as capstan_main

SKIPS = Path(__file__).with_name("checkov-skips.yaml")
SAMPLES = ROOT / "manifests" / "samples"
NAMESPACE = "ml-team"
WHERE = {"chart", "samples"}


@dataclass(frozen=True)
class Finding:
    """One failed check: its id, where ("chart" or "samples"), checkov's resource id, the file."""

    check: str
    where: str
    resource: str
    file: str

    def __str__(self) -> str:
        return f"{self.check} {self.where} {self.resource} ({self.file})"


@dataclass(frozen=True)
class Skip:
    """One entry of checkov-skips.yaml."""

    check: str
    where: str
    resources: tuple[str, ...]
    reason: str

    def matches(self, f: Finding) -> bool:
        return (
            f.check == self.check
            and f.where == self.where
            and any(fnmatch.fnmatchcase(f.resource, g) for g in self.resources)
        )


def load_skips() -> list[Skip]:
    doc = yaml.safe_load(SKIPS.read_text())
    return [Skip(s["check"], s["in"], tuple(s["resources"]), s["reason"]) for s in doc["skips"]]


def _required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CAPSTAN_E2E", "0") not in ("", "0")


def render_sample(path: Path) -> str:
    """``capstan render -n NAMESPACE -f path``: the objects the operator would create."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert capstan_main(["render", "-n", NAMESPACE, "-f", str(path)]) == 0
    return out.getvalue()


def parse_report(text: str) -> list[Finding]:
    """Failed checks of checkov's JSON report (one framework: an object; several: a list)."""
    report = json.loads(text)
    findings = []
    for part in report if isinstance(report, list) else [report]:
        for check in part["results"]["failed_checks"]:
            name = Path(check["file_path"]).name
            where = "chart" if name == "chart.yaml" else "samples"
            findings.append(Finding(check["check_id"], where, check["resource"], name))
    return findings


@pytest.fixture(scope="module")
def findings(tmp_path_factory: pytest.TempPathFactory) -> list[Finding]:
    checkov = tool("checkov")
    if checkov is None or tool("helm") is None:
        msg = "checkov or helm missing: run scripts/install-tools.sh"
        if _required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    scanned = tmp_path_factory.mktemp("checkov")
    (scanned / "chart.yaml").write_text(helm_template({}))
    samples = sorted(SAMPLES.glob("*.yaml"))
    assert samples
    for sample in samples:
        (scanned / f"samples-{sample.name}").write_text(render_sample(sample))
    proc = subprocess.run(
        [checkov, "-d", str(scanned), "--framework", "kubernetes", "-o", "json",
         "--skip-download", "--no-fail-on-crash"],
        capture_output=True, text=True, timeout=600,
    )
    # Exit code 1 just means "some check failed"; a crash or no report leaves no JSON to read.
    if proc.returncode not in (0, 1) or not proc.stdout.strip().startswith(("{", "[")):
        pytest.fail(f"checkov failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    parts: list[dict[str, Any]] = report if isinstance(report, list) else [report]
    files = {Path(r["file_path"]).name for p in parts for key in ("passed_checks", "failed_checks")
             for r in p["results"][key]}
    # Every file was read (a parse problem would silently drop its objects from the scan).
    assert files == {"chart.yaml", *(f"samples-{s.name}" for s in samples)}
    assert all(p["summary"]["parsing_errors"] == 0 for p in parts)
    return parse_report(proc.stdout)


def test_skip_list_is_well_formed() -> None:
    skips = load_skips()
    assert skips
    for s in skips:
        assert s.check.startswith(("CKV_K8S_", "CKV2_K8S_")), s
        assert s.where in WHERE, s
        assert s.resources and all(isinstance(g, str) and g for g in s.resources), s
        assert len(s.reason.split()) >= 8, f"{s.check}: say why it cannot hold"
    keys = [(s.check, s.where) for s in skips]
    assert len(keys) == len(set(keys)), "one skip per check and place"


def test_no_finding_outside_the_skip_list(findings: list[Finding]) -> None:
    skips = load_skips()
    unexplained = [f for f in findings if not any(s.matches(f) for s in skips)]
    assert not unexplained, "new checkov findings (fix them, or add a justified skip):\n" + "\n".join(
        map(str, unexplained)
    )


def test_every_skip_is_still_needed(findings: list[Finding]) -> None:
    stale = [s for s in load_skips() if not any(s.matches(f) for f in findings)]
    assert not stale, "skips that match no finding any more (remove them): " + ", ".join(
        f"{s.check} in {s.where}" for s in stale
    )


def test_matching_is_by_check_place_and_resource() -> None:
    skip = Skip("CKV_K8S_25", "samples", ("Pod.*.gpt-rdma-*",), "reason")
    assert skip.matches(Finding("CKV_K8S_25", "samples", "Pod.ml-team.gpt-rdma-0", "f"))
    assert not skip.matches(Finding("CKV_K8S_25", "samples", "Pod.ml-team.gpt-tiny-0", "f"))
    assert not skip.matches(Finding("CKV_K8S_25", "chart", "Pod.ml-team.gpt-rdma-0", "f"))
    assert not skip.matches(Finding("CKV_K8S_28", "samples", "Pod.ml-team.gpt-rdma-0", "f"))


def test_report_parsing() -> None:
    one = {"check_type": "kubernetes", "results": {"failed_checks": [
        {"check_id": "CKV_K8S_20", "file_path": "/samples-x.yaml", "resource": "Pod.ns.p"}]}}
    assert parse_report(json.dumps(one)) == [Finding("CKV_K8S_20", "samples", "Pod.ns.p", "samples-x.yaml")]
    assert parse_report(json.dumps([one, one]))[1].check == "CKV_K8S_20"
