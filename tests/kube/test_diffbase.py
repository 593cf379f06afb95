"""kopf's diff-base never copies the spec: a credential in ``spec.env`` stays out of annotations."""

from __future__ import annotations

import json
import uuid
from typing import Any

import kopf
import pytest
from tests.api.bodies import make_trainingjob
from tests.kube import scenarios as sc
from tests.kube.conftest import Cluster
from tests.support.kube import wait_for

from capstan.kube.diffbase import DIGEST_KEY, DigestDiffBaseStorage
from capstan.kube.resources import TRAININGJOBS

pytestmark = pytest.mark.timeout(60)
DIFFBASE = "capstan.dev/last-handled-configuration"


def _annotations(obj: dict[str, Any] | None) -> dict[str, str]:
    return dict(((obj or {}).get("metadata") or {}).get("annotations") or {})


def _no_copy(obj: dict[str, Any], *secrets: str) -> None:
    text = json.dumps(_annotations(obj))
    for secret in secrets:
        assert secret not in text, f"{secret} copied into annotations: {text}"


async def test_env_value_is_not_copied_by_kopf(cluster: Cluster, env: sc.Env, operator: None) -> None:
    secret = f"tok-{uuid.uuid4().hex}"
    body = sc.job_body(env, "with-secret", workers=1)
    body["spec"]["env"] = [{"name": "TOKEN", "value": secret}]
    body["metadata"]["annotations"] = {"team": "a"}
    await cluster.api.create(body)

    async def handled() -> dict[str, Any] | None:
        job = await sc.get_job(env, "with-secret")
        return job if DIFFBASE in _annotations(job) else None

    job = await wait_for(handled, what="kopf's diff-base annotation")
    _no_copy(job, secret)
    first = json.loads(_annotations(job)[DIFFBASE])
    assert list(first) == [DIGEST_KEY] and len(first[DIGEST_KEY]) == 64

    # Rotating the value is still a change kopf sees (a new digest), and still not copied.
    rotated = f"tok-{uuid.uuid4().hex}"
    await cluster.api.patch(
        TRAININGJOBS, env.namespace, "with-secret", {"spec": {"env": [{"name": "TOKEN", "value": rotated}]}}
    )

    async def rehandled() -> dict[str, Any] | None:
        job = await sc.get_job(env, "with-secret")
        base = _annotations(job).get(DIFFBASE)
        return job if base and json.loads(base) != first else None

    job = await wait_for(rehandled, what="a new digest after the env change")
    _no_copy(job, secret, rotated)


def test_digest_ignores_own_bookkeeping_and_tracks_the_spec() -> None:
    storage = DigestDiffBaseStorage(prefix="capstan.dev", key="last-handled-configuration")

    def essence(value: str, progress: str = "x") -> Any:
        body = (
            make_trainingjob("j")
            .without("image", "workers")
            .meta(annotations={"capstan.dev/cleanup": progress, "team": "a"})
            .spec(env=[{"name": "TOKEN", "value": value}])
            .status(phase="Running")
            .obj()
        )
        return storage.build(body=kopf.Body(body))

    assert essence("hunter2", "x") == essence("hunter2", "y")  # our progress annotations: no change
    assert essence("hunter2") != essence("hunter3")
    assert "hunter2" not in json.dumps(essence("hunter2"))
