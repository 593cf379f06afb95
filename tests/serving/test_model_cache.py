"""``model.cache``: a uri fetched once per revision into a shared volume, not once per pod."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sim import Cluster, at, make_ms, run

from capstan.admission import validate
from capstan.labels import LABEL_REVISION, LABEL_SERVING

Validate = Callable[[dict[str, Any]], None]
CACHED = {"uri": "hf://org/model@main", "cache": {"size": "200Gi", "storageClassName": "shared-rwx"}}


def _objects(**spec: Any) -> dict[str, dict[str, Any]]:
    _, plan = run(make_ms(replicas=3, **spec), Cluster(), at(0))
    return {o["kind"]: o for o in plan.objects if o["kind"] != "Service"}


def test_a_cached_uri_is_fetched_by_one_job_into_a_volume_every_pod_mounts_read_only(
    k8s_valid: Validate,
) -> None:
    env = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}]
    template = {"spec": {"serviceAccountName": "model-reader", "imagePullSecrets": [{"name": "regcred"}],
                         "containers": [{"name": "server", "env": env}]}}
    objs = _objects(model=CACHED, template=template)
    pvc, job, dep = objs["PersistentVolumeClaim"], objs["Job"], objs["Deployment"]
    for obj in (pvc, job, dep):
        k8s_valid(obj)
    rev = dep["metadata"]["name"]
    assert pvc["metadata"]["name"] == f"{rev}-model" and job["metadata"]["name"] == f"{rev}-fetch"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert pvc["spec"]["storageClassName"] == "shared-rwx"

    pod = job["spec"]["template"]["spec"]
    (fetch,) = pod["containers"]
    assert pod["volumes"] == [{"name": "model", "persistentVolumeClaim": {"claimName": f"{rev}-model"}}]
    assert {"name": "MODEL_URI", "value": "hf://org/model@main"} in fetch["env"] and env[0] in fetch["env"]
    script = fetch["command"][-1]
    assert script.startswith("[ -f /model/.capstan-fetched ] && exit 0")  # a retried Job is done at once
    assert script.endswith("touch /model/.capstan-fetched") and "pip install" not in script
    assert pod["serviceAccountName"] == "model-reader" and pod["imagePullSecrets"] == [{"name": "regcred"}]
    # The fetch pod is not one of the revision's servers: no Service or analysis selects it.
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert LABEL_SERVING not in labels and LABEL_REVISION not in labels

    server = dep["spec"]["template"]["spec"]
    claim = {"claimName": f"{rev}-model", "readOnly": True}
    assert {"name": "model", "persistentVolumeClaim": claim} in server["volumes"]
    (wait,) = server["initContainers"]
    assert wait["name"] == "model-wait" and ".capstan-fetched" in wait["command"][-1]
    assert all(m.get("readOnly") for m in wait["volumeMounts"])


def test_without_cache_each_pod_downloads_and_installs_nothing(k8s_valid: Validate) -> None:
    objs = _objects(model={"uri": "hf://org/model"})
    assert "Job" not in objs and "PersistentVolumeClaim" not in objs
    server = objs["Deployment"]["spec"]["template"]["spec"]
    (download,) = server["initContainers"]
    assert {"name": "model", "emptyDir": {}} in server["volumes"]
    assert "pip" not in download["command"][-1] and "capstan-fetch" in download["image"]


def test_a_new_revision_fetches_again_and_the_old_fetch_goes_with_its_revision() -> None:
    c = Cluster()
    ms, _ = run(make_ms(replicas=2, model=CACHED), c, at(0))
    ms, _ = run(ms, c, at(1))
    old = ms.status.stable_revision
    assert {f"{old}-fetch"} == c.names("Job")
    body = {**ms.spec.wire(), "model": {**CACHED, "uri": "hf://org/model@v2"}}
    ms = make_ms(generation=2, **body).model_copy(update={"status": ms.status})
    for t in range(2, 10):
        ms, _ = run(ms, c, at(t))
    new = ms.status.stable_revision
    assert new != old
    assert c.names("Job") == {f"{new}-fetch"} and c.names("PersistentVolumeClaim") == {f"{new}-model"}


def test_cache_needs_a_uri_that_is_fetched() -> None:
    def ms(model: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": "capstan.dev/v1alpha1", "kind": "ModelServing",
                "metadata": {"name": "m", "namespace": "ml"}, "spec": {"model": model}}

    cache = {"size": "10Gi"}
    for model in ({"uri": "pvc://models/llama", "cache": cache}, {"pvc": {"claimName": "m"}, "cache": cache},
                  {"fromTrainingJob": {"name": "gpt"}, "cache": cache}):
        errors = validate(ms(model))
        assert any("spec.model" in e and "cache" in e for e in errors), errors
    assert validate(ms({"uri": "s3://bucket/llama", "cache": cache})) == []
