"""`capstan render` of every sample gives objects Kubernetes accepts (the GitOps preview is real)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from capstan.cli import main

SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("*.yaml"))
# Kinds with no schema in kubernetes-validate's built-in set (CRDs of other projects).
FOREIGN = {"HTTPRoute", "VolumeSnapshot"}


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
def test_rendered_sample_objects_are_valid(sample: Path, capsys: Any, k8s_valid: Any) -> None:
    assert main(["render", "-f", str(sample)]) == 0
    objs = [o for o in yaml.safe_load_all(capsys.readouterr().out) if o]
    assert objs, f"{sample.name} rendered nothing"
    for obj in objs:
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "capstan"
        if obj["kind"] not in FOREIGN:
            k8s_valid(obj)
