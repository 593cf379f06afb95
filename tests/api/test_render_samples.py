"""`capstan render` of every sample gives objects Kubernetes accepts (the GitOps preview is real)."""

from __future__ import annotations

import re
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
        pod = obj["spec"] if obj["kind"] == "Pod" else (obj.get("spec") or {}).get("template", {}).get("spec")
        if pod:
            assert not _duplicate_map_keys(pod), f"{obj['kind']} {obj['metadata']['name']}"


def _duplicate_map_keys(pod: dict[str, Any]) -> list[str]:
    """Keys repeated in the pod's list-map fields, which server-side apply refuses outright
    (``duplicate entries for key``) although the JSON schema, and kubernetes-validate, allow them."""
    found: list[str] = []

    def check(where: str, items: list[dict[str, Any]], *key: str) -> None:
        seen = [tuple(i.get(k) for k in key) for i in items]
        found.extend(f"{where}: {k}" for k in {k for k in seen if seen.count(k) > 1})

    containers = [*pod.get("initContainers", []), *pod.get("containers", [])]
    check("containers", containers, "name")
    check("volumes", pod.get("volumes", []), "name")
    for c in containers:
        check(f"{c['name']}.env", c.get("env", []), "name")
        check(f"{c['name']}.volumeMounts", c.get("volumeMounts", []), "mountPath")
        check(f"{c['name']}.ports", c.get("ports", []), "containerPort", "protocol")
    return found


class Yaml12Loader(yaml.SafeLoader):
    """Reads plain scalars as YAML 1.2's core schema does (kubectl, Helm): ``1e-5`` is a number."""


_CORE = {
    "tag:yaml.org,2002:bool": r"^(?:true|True|TRUE|false|False|FALSE)$",
    "tag:yaml.org,2002:int": r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$",
    "tag:yaml.org,2002:float": (
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    "tag:yaml.org,2002:null": r"^(?:~|null|Null|NULL|)$",
}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _CORE]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _rx in _CORE.items():
    Yaml12Loader.add_implicit_resolver(_tag, re.compile(_rx), list("-+0123456789.tTfFnN~"))
Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", lambda ld, n: ld.construct_scalar(n).lower() == "true")
Yaml12Loader.add_constructor("tag:yaml.org,2002:int", lambda ld, n: int(ld.construct_scalar(n), 0))
Yaml12Loader.add_constructor(
    "tag:yaml.org,2002:float",
    lambda ld, n: float(ld.construct_scalar(n).lower().replace(".inf", "inf").replace(".nan", "nan")),
)


def test_rendered_strings_stay_strings_for_yaml_1_2_readers(capsys: Any, tmp_path: Path) -> None:
    # kubectl reads an unquoted 1e-5 as a number and refuses the Pod ("cannot unmarshal number into
    # ... args of type string"): every such string must come out quoted.
    doc = yaml.safe_load((SAMPLES[0].parent / "trainingjob-restore.yaml").read_text())
    tricky = ["1e-5", ".5", "0o17", "0x1F", "+12", "True", "FALSE", "null", "~", ".inf", "-.Inf", ".NaN"]
    doc["spec"]["env"] = [{"name": f"V{i}", "value": v} for i, v in enumerate(tricky)]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["render", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    as_written = [o for o in yaml.safe_load_all(out) if o]
    as_kubectl_reads = [o for o in yaml.load_all(out, Loader=Yaml12Loader) if o]
    assert as_kubectl_reads == as_written
    pod = next(o for o in as_kubectl_reads if o["kind"] == "Pod")
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert [env[f"V{i}"] for i in range(len(tricky))] == tricky
    assert "1e-5" in pod["spec"]["containers"][0]["args"]
