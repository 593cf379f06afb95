"""Bad input is rejected with a message that names the field, on the CLI and in the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from capstan.api.loading import InvalidResource, parse_resource
from capstan.cli import main
from capstan.render import render_trainingjob


def tj(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "capstan.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "gpt"},
        "spec": {"image": "img", "workers": 2, **spec},
    }


BAD = [
    (tj(workers=0), "spec.workers", "greater than or equal to 1"),
    (tj(gpusPerWorker=-1), "spec.gpusPerWorker", "greater than or equal to 0"),
    (tj(topology={"policy": "Sometimes"}), "spec.topology.policy", "'Required', 'Preferred' or 'None'"),
    (tj(resources={"memory": "lots"}), "spec.resources.memory", "not a Kubernetes quantity"),
    (tj(checkpoint={"snapshots": {}}), "spec", "snapshots need checkpoint.volume"),
    (
        tj(checkpoint={"volume": {"size": "1Gi", "claimName": "x"}}),
        "spec.checkpoint.volume",
        "exactly one of size",
    ),
    (tj(workerz=3), "spec.workerz", "unknown field"),
    (tj(image=""), "spec.image", "at least 1 character"),
    ({**tj(), "metadata": {"name": "GPT_Small"}}, "metadata.name", "should match pattern"),
    ({**tj(), "metadata": {"name": "a" * 254}}, "metadata.name", "at most 253 characters"),
    ({**tj(), "kind": "TrainJob"}, "kind", "expected one of TrainingJob, ModelServing"),
    ({**tj(), "apiVersion": "capstan.dev/v2"}, "apiVersion", "expected capstan.dev/v1alpha1"),
    (
        {
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": "m"},
            "spec": {"model": {}},
        },
        "spec.model",
        "exactly one of fromTrainingJob, uri or pvc",
    ),
    (
        {
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": "m"},
            "spec": {"model": {"uri": "s3://b/m"}, "rollout": {"steps": [{"weight": 150}]}},
        },
        "spec.rollout.steps[0].weight",
        "less than or equal to 100",
    ),
    (
        {
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": "m"},
            "spec": {
                "model": {"uri": "s3://b/m"},
                "rollout": {"steps": [{"weight": 10, "pause": "2 minutes"}]},
            },
        },
        "spec.rollout.steps[0].pause",
        "should match pattern",
    ),
]


@pytest.mark.parametrize(("body", "field", "reason"), BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_rejected_with_field_path(body: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidResource) as err:
        parse_resource(body)
    assert any(line.startswith(f"{field}:") and reason in line for line in err.value.errors), err.value.errors


def test_cli_render_exits_nonzero_with_field_path(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tj(workers=0, gpusPerWorker=-2)))
    assert main(["render", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.workers" in err and "spec.gpusPerWorker" in err


@pytest.mark.parametrize("name", ["a" * 63, "a" * 253, "9lives", "gpt.v2.small", "x"])
def test_any_legal_name_gives_valid_children(name: str, k8s_valid: Any) -> None:
    job = parse_resource({**tj(workers=3), "metadata": {"name": name, "uid": "u-1"}})
    for obj in render_trainingjob(job):  # type: ignore[arg-type]
        k8s_valid(obj)
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63
        for value in meta["labels"].values():
            assert len(value) <= 63
        if obj["kind"] == "Pod":
            assert len(obj["spec"]["hostname"]) <= 63 and obj["spec"]["hostname"][0].isalpha()
