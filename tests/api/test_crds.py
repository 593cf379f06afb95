"""The CRDs are generated from the models, committed, structural and documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from capstan.api.crdgen import build_crds, stale_crds
from capstan.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_committed_crds_are_fresh() -> None:
    assert stale_crds(ROOT / "crds") == [], "run `capstan crds` and commit crds/"


def test_crds_check_command_fails_on_stale_file(tmp_path: Path, capsys: Any) -> None:
    assert main(["crds", "--out", str(tmp_path)]) == 0
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 0
    target = tmp_path / "capstan.dev_trainingjobs.yaml"
    target.write_text(target.read_text().replace("Number of worker pods", "Workers"))
    assert main(["crds", "--check", "--out", str(tmp_path)]) == 1
    assert "capstan.dev_trainingjobs.yaml" in capsys.readouterr().err


def _walk(node: Any, path: str, out: list[tuple[str, dict[str, Any]]]) -> None:
    if not isinstance(node, dict):
        return
    out.append((path, node))
    for name, sub in (node.get("properties") or {}).items():
        _walk(sub, f"{path}.{name}", out)
    if isinstance(node.get("items"), dict):
        _walk(node["items"], f"{path}[]", out)
    if isinstance(node.get("additionalProperties"), dict):
        _walk(node["additionalProperties"], f"{path}{{}}", out)


def test_schemas_are_structural_and_explained() -> None:
    for name, crd in build_crds().items():
        version = crd["spec"]["versions"][0]
        nodes: list[tuple[str, dict[str, Any]]] = []
        _walk(version["schema"]["openAPIV3Schema"], "", nodes)
        for path, node in nodes:
            # Structural: every node has a type, except int-or-string nodes.
            assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{name}{path}: no type"
            assert ("$ref" not in node and "additionalProperties" not in node) or isinstance(
                node.get("additionalProperties"), dict
            ), f"{name}{path}"
            # The API server allows nothing but the type on the root metadata (no description).
            # Upstream's PodSpec has its own descriptions (all but dnsConfig.options[].value).
            upstream = path.startswith(".spec.template.spec.")
            if path.count(".") >= 1 and not path.endswith(("[]", "{}")) and path != ".metadata" \
                    and not upstream:
                assert node.get("description"), f"{name}{path}: no description for kubectl explain"
            for branch in node.get("anyOf", []):
                assert set(branch) <= {"type"}, f"{name}{path}: anyOf branches may only name a type"


def test_names_columns_and_subresources() -> None:
    crds = build_crds()
    tj = crds["capstan.dev_trainingjobs.yaml"]["spec"]
    ms = crds["capstan.dev_modelservings.yaml"]["spec"]
    assert tj["names"]["shortNames"] == ["tj"] and ms["names"]["shortNames"] == ["ms"]
    assert "capstan" in tj["names"]["categories"]
    cols = [c["name"] for c in tj["versions"][0]["additionalPrinterColumns"]]
    assert {"Phase", "Workers", "GPUs", "Restarts", "Age"} <= set(cols)
    assert tj["versions"][0]["subresources"] == {"status": {}}
    assert ms["versions"][0]["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_schema_defaults_match_model_defaults() -> None:
    spec = build_crds()["capstan.dev_trainingjobs.yaml"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    props = spec["properties"]["spec"]["properties"]
    assert props["gpusPerWorker"]["default"] == 0
    assert props["failurePolicy"]["properties"]["maxRestarts"]["default"] == 3
    assert props["topology"]["properties"]["policy"]["enum"] == ["Required", "Preferred", "None"]


def test_crd_yaml_round_trips() -> None:
    for path in (ROOT / "crds").glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "CustomResourceDefinition"


def test_each_crd_fits_a_client_side_kubectl_apply() -> None:
    """Both CRDs embed upstream's PodSpec (spec.template): a client-side `kubectl apply` stores the
    whole object as JSON in its last-applied annotation, which the API server caps at 256 KiB."""
    import json

    for name, crd in build_crds().items():
        size = len(json.dumps(crd, separators=(",", ":")))
        assert size < 256 * 1024 - 4096, f"{name}: {size} bytes of JSON"
