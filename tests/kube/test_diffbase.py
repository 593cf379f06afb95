"""kopf keeps no diff-base: nothing of the spec is copied into annotations (a credential in
``spec.env`` stays where the user put it), and kopf writes nothing but its finalizer."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster

from capstan.kube.resources import TRAININGJOBS
from capstan.labels import FINALIZER

pytestmark = pytest.mark.timeout(60)


def _annotations(obj: dict[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


async def test_kopf_copies_nothing_of_the_spec_and_writes_only_its_finalizer(
    cluster: Cluster, env: sc.Env, operator: None
) -> None:
    secret = f"tok-{uuid.uuid4().hex}"
    body = sc.job_body(env, "with-secret", workers=1)
    body["spec"]["env"] = [{"name": "TOKEN", "value": secret}]
    body["metadata"]["annotations"] = {"team": "a"}
    await cluster.api.create(body)
    await sc.wait_pods(env, "with-secret", 1)
    # a spec change is reconciled too (the loop is woken by the event, not by a diff)
    rotated = f"tok-{uuid.uuid4().hex}"
    await cluster.api.patch(
        TRAININGJOBS, env.namespace, "with-secret", {"spec": {"env": [{"name": "TOKEN", "value": rotated}]}}
    )
    await asyncio.sleep(1.0)
    job = await sc.get_job(env, "with-secret")
    assert job is not None
    assert _annotations(job) == {"team": "a"}, _annotations(job)  # the user's, and nothing of kopf's
    assert FINALIZER in (job["metadata"].get("finalizers") or [])
    text = json.dumps(job["metadata"])
    assert secret not in text and rotated not in text
    # kopf's own writes to the object touch its finalizer only (no diff-base after creation or change)
    kopf_patches = [r for r in cluster.emulator if r.headers.get("User-Agent", "").startswith("kopf")
                    and r.action is not None and r.action.value == "UPDATE"
                    and r.resource is not None and r.resource.plural == "trainingjobs"
                    and r.namespace == env.namespace]
    assert kopf_patches
    touched = {op["path"] for r in kopf_patches for op in r.data if op["op"] != "test"}
    assert touched <= {"/metadata/finalizers", "/metadata/resourceVersion"}, touched
