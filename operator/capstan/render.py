"""Everything the operator would create for a set of resources, as plain objects (GitOps preview)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import yaml

from capstan.api.loading import CapstanObject, InvalidDocuments, InvalidObject
from capstan.api.modelserving import ModelServing
from capstan.api.trainingjob import TrainingJob
from capstan.config import OperatorConfig
from capstan.naming import dns_label
from capstan.training.pods import (
    checkpoint_pvc,
    gang_network_policy,
    headless_service,
    needs_service,
    worker_pod,
)

PREVIEW_UID = "00000000-0000-0000-0000-000000000000"

# Plain scalars that YAML 1.2 (kubectl, Helm, Go's sigs.k8s.io/yaml) reads as numbers, booleans or
# null while PyYAML (YAML 1.1) writes them unquoted as strings: "1e-5", "0o17", ".5e3", "True".
_YAML12_NOT_STR = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|0x[0-9a-fA-F]+|0o[0-7]+"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)|true|True|TRUE|false|False|FALSE|null|Null|NULL|~)$"
)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes every string a YAML 1.2 reader would not read back as a string."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "'" if _YAML12_NOT_STR.match(value) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def to_yaml(objs: list[dict[str, Any]]) -> str:
    """``objs`` as a YAML stream that kubectl and Helm read back exactly (strings stay strings)."""
    return yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False)


def _with_uid(res: CapstanObject) -> CapstanObject:
    # A preview has no server-assigned uid; a fixed placeholder keeps ownerReferences in the output.
    if res.metadata.uid:
        return res
    return res.model_copy(update={"metadata": res.metadata.model_copy(update={"uid": PREVIEW_UID})})


def render_trainingjob(job: TrainingJob, config: OperatorConfig | None = None) -> list[dict[str, Any]]:
    """PVC (if any), headless Service (more than one worker) and the first gang's pods, unpinned, as
    an operator with ``config`` (default: an environment that sets nothing) would create them."""
    levels = (config or OperatorConfig()).topology_levels
    job = _with_uid(job)  # type: ignore[assignment]
    objs: list[dict[str, Any]] = []
    pvc = checkpoint_pvc(job)
    if pvc is not None:
        objs.append(pvc)
    if needs_service(job):
        objs.append(headless_service(job))
    policy = gang_network_policy(job, (config or OperatorConfig()).operator_namespace)
    if policy is not None:
        objs.append(policy)
    objs.extend(worker_pod(job, rank, attempt=0, levels=levels) for rank in range(job.spec.workers))
    return objs


def _preview_training_job(ms: ModelServing, jobs: dict[str, TrainingJob]) -> dict[str, Any] | None:
    """A stand-in for the TrainingJob a ModelServing serves from: its completion snapshot, ready."""
    ref = ms.spec.model.from_training_job
    if ref is None:
        return None
    job = jobs.get(ref.name)
    volume = job.spec.checkpoint.volume.wire() if job and job.spec.checkpoint.volume else {"size": "10Gi"}
    snap = ref.checkpoint
    if snap == "Latest":
        snap = dns_label(ref.name, suffix="-ckpt-final")
    return {
        "spec": {"checkpoint": {"volume": volume}},
        "status": {"checkpoints": [{"name": snap, "readyToUse": True}]},
    }


def render_modelserving(
    ms: ModelServing, jobs: dict[str, TrainingJob] | None = None, config: OperatorConfig | None = None
) -> list[dict[str, Any]]:
    """The first revision's objects, as the serving planner of an operator with ``config`` would
    create them."""
    from capstan.serving.plan import Observed, plan_modelserving

    ms = _with_uid(ms)  # type: ignore[assignment]
    observed = Observed(training_job=_preview_training_job(ms, jobs or {}))
    namespace = (config or OperatorConfig()).operator_namespace
    plan = plan_modelserving(ms, observed, datetime.now(UTC), operator_namespace=namespace)
    if not plan.objects:
        raise InvalidObject(f"ModelServing {ms.metadata.name!r}", [plan.status.message])
    return plan.objects


def render(resources: list[CapstanObject], config: OperatorConfig | None = None) -> list[dict[str, Any]]:
    """Objects for every resource, in file order, as an operator with ``config`` would create them;
    every resource that cannot be rendered is reported (:class:`InvalidDocuments` when more than
    one)."""
    jobs = {r.metadata.name: r for r in resources if isinstance(r, TrainingJob)}
    out: list[dict[str, Any]] = []
    problems: list[InvalidObject] = []
    for res in resources:
        try:
            if isinstance(res, TrainingJob):
                out.extend(render_trainingjob(res, config))
            else:
                out.extend(render_modelserving(res, jobs, config))
        except InvalidObject as exc:
            problems.append(exc)
    if problems:
        raise problems[0] if len(problems) == 1 else InvalidDocuments(problems)
    return out
