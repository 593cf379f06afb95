"""Everything the operator would create for a set of resources, as plain objects (GitOps preview)."""

from __future__ import annotations

from typing import Any

from capstan.api.loading import Resource
from capstan.api.modelserving import ModelServing
from capstan.api.trainingjob import TrainingJob
from capstan.training.pods import checkpoint_pvc, headless_service, worker_pod

PREVIEW_UID = "00000000-0000-0000-0000-000000000000"


def _with_uid(res: Resource) -> Resource:
    # A preview has no server-assigned uid; a fixed placeholder keeps ownerReferences in the output.
    if res.metadata.uid:
        return res
    return res.model_copy(update={"metadata": res.metadata.model_copy(update={"uid": PREVIEW_UID})})


def render_trainingjob(job: TrainingJob) -> list[dict[str, Any]]:
    """PVC (if any), headless Service and the first gang's pods, unpinned."""
    job = _with_uid(job)  # type: ignore[assignment]
    objs: list[dict[str, Any]] = []
    pvc = checkpoint_pvc(job)
    if pvc is not None:
        objs.append(pvc)
    objs.append(headless_service(job))
    objs.extend(worker_pod(job, rank, attempt=0) for rank in range(job.spec.workers))
    return objs


def render_modelserving(ms: ModelServing) -> list[dict[str, Any]]:
    """The first revision's objects, as the serving planner would create them."""
    from capstan.serving import render as serving_render

    return serving_render.render_modelserving(_with_uid(ms))  # type: ignore[arg-type]


def render(resources: list[Resource]) -> list[dict[str, Any]]:
    """Objects for every resource, in file order."""
    out: list[dict[str, Any]] = []
    for res in resources:
        if isinstance(res, TrainingJob):
            out.extend(render_trainingjob(res))
        else:
            out.extend(render_modelserving(res))
    return out
