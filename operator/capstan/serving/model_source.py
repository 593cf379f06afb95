"""Where a revision's model comes from, as volumes, mounts, init containers and a path.

- ``model.pvc``: the claim mounted read-only at ``/model``; path ``/model/<pvc.path>``.
- ``model.uri``: an init container downloads into an ``emptyDir`` at ``/model``, one small image
  per scheme: ``s3://`` s5cmd, ``gs://`` gcloud storage, ``https://`` curl (a ``.tar.gz``/``.tgz``
  is unpacked, anything else saved under its file name), ``hf://org/repo[@rev]`` huggingface_hub's
  ``snapshot_download``; ``pvc://claim/dir`` is the same as ``model.pvc``. The URI reaches the
  script through ``$MODEL_URI``, never spliced into shell text. Credentials come from the pod's
  service account (IRSA / workload identity) or ``spec.env``, which the init container also gets.
  With ``model.cache`` the URI is fetched once per revision instead: a Job ``<revision>-fetch``
  downloads into a PVC ``<revision>-model`` (ReadWriteMany) and writes a marker last; every pod
  mounts the claim read-only and waits in a small init container for the marker. Without it each
  pod downloads into its own emptyDir (node ephemeral storage), once per pod.
- ``model.fromTrainingJob``: a PVC ``<revision>-model`` restored from the job's newest ready
  VolumeSnapshot (``checkpoint: Latest``) or the named one, mounted read-only; path
  ``/model/<fromTrainingJob.path>``. The snapshot name is part of the revision content, so a new
  ready snapshot makes a new revision that rolls out through the canary steps.
"""

from __future__ import annotations

import copy
import posixpath
from dataclasses import dataclass, field
from typing import Any

from capstan.api.modelserving import MODEL_MOUNT, ModelServing
from capstan.fields import dig
from capstan.security import REFERENCE_UID, container_security_context

MOUNT = MODEL_MOUNT
VOLUME = "model"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"

S5CMD_IMAGE = "peakcom/s5cmd:v2.3.0"
GCLOUD_IMAGE = "gcr.io/google.com/cloudsdktool/google-cloud-cli:522.0.0-slim"
CURL_IMAGE = "curlimages/curl:8.14.1"
#: huggingface_hub preinstalled (workloads/Dockerfile.fetch): nothing is installed at pod start.
HF_IMAGE = "ghcr.io/capstan-dev/capstan-fetch:0.1.0"
#: A file the fetch Job writes once the model is whole; pods of a cached revision wait for it.
FETCHED_MARKER = ".capstan-fetched"
# The download is network- and disk-bound: a little CPU, and memory for the tools' part buffers.
DOWNLOAD_RESOURCES = {
    "requests": {"cpu": "500m", "memory": "512Mi"},
    "limits": {"cpu": "2", "memory": "2Gi"},
}


class ModelNotReady(Exception):
    """The model cannot be resolved yet (no ready snapshot, TrainingJob missing); ``str`` says why."""


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: identity (part of the revision hash) and how a pod gets it."""

    identity: str
    path: str
    snapshot: str | None = None
    claim_size: str | None = None
    storage_class: str | None = None
    access_modes: tuple[str, ...] = ("ReadWriteMany",)
    uri: str | None = None
    claim: str | None = None
    cached: bool = False  # uri fetched once per revision into <revision>-model by a Job
    extra: dict[str, Any] = field(default_factory=dict)


def _join(base: str, sub: str) -> str:
    sub = sub.strip("/")
    return posixpath.normpath(posixpath.join(base, sub)) if sub else base


def _pick_snapshot(checkpoints: list[dict[str, Any]], wanted: str) -> dict[str, Any] | None:
    ready = [c for c in checkpoints if c.get("readyToUse")]
    if wanted == "Latest":
        # status.checkpoints is kept newest last; the step (when known) breaks ties in reordered lists.
        return max(enumerate(ready), key=lambda ic: (ic[1].get("step") or -1, ic[0]))[1] if ready else None
    return next((c for c in ready if c.get("name") == wanted), None)


def resolve_model(
    ms: ModelServing,
    training_job: dict[str, Any] | None = None,
    snapshots: dict[str, dict[str, Any]] | None = None,
) -> ModelRef:
    """Resolve ``ms.spec.model`` against observed objects; raise :class:`ModelNotReady` if it can't be.

    ``training_job`` is the observed TrainingJob dict (for ``fromTrainingJob``); ``snapshots``
    maps VolumeSnapshot name to the observed object, used for its ``status.restoreSize``.
    """
    src = ms.spec.model
    if src.pvc is not None:
        return ModelRef(
            identity=f"pvc:{src.pvc.claim_name}/{src.pvc.path}",
            path=_join(MOUNT, src.pvc.path),
            claim=src.pvc.claim_name,
        )
    if src.uri is not None:
        if src.uri.startswith("pvc://"):
            claim, _, sub = src.uri.removeprefix("pvc://").partition("/")
            return ModelRef(identity=f"pvc:{claim}/{sub}", path=_join(MOUNT, sub), claim=claim)
        if src.cache is not None:
            return ModelRef(identity=src.uri, path=MOUNT, uri=src.uri, cached=True,
                            claim_size=str(src.cache.size), storage_class=src.cache.storage_class_name)
        return ModelRef(identity=src.uri, path=MOUNT, uri=src.uri)
    ftj = src.from_training_job
    assert ftj is not None  # the ModelSource rule guarantees exactly one source
    if training_job is None:
        raise ModelNotReady(f"TrainingJob {ftj.name!r} not found")
    checkpoints = dig(training_job, "status", "checkpoints") or []
    record = _pick_snapshot(checkpoints, ftj.checkpoint)
    if record is None:
        which = (
            "a ready checkpoint snapshot" if ftj.checkpoint == "Latest" else f"snapshot {ftj.checkpoint!r}"
        )
        raise ModelNotReady(f"waiting for {which} of TrainingJob {ftj.name!r}")
    snap = str(record["name"])
    volume = dig(training_job, "spec", "checkpoint", "volume") or {}
    observed = dig(snapshots, snap) or {}
    # A restored PVC must be at least the snapshot's restoreSize; the job's volume size is that size
    # when the operator created the volume, the snapshot's own status covers adopted volumes.
    size = dig(observed, "status", "restoreSize") or volume.get("size")
    if not size:
        raise ModelNotReady(
            f"size of snapshot {snap!r} unknown (no restoreSize yet, no checkpoint.volume.size)"
        )
    return ModelRef(
        identity=f"snapshot:{ftj.name}/{snap}",
        path=_join(MOUNT, ftj.path),
        snapshot=snap,
        claim_size=str(size),
        storage_class=volume.get("storageClassName"),
    )


def model_claim_name(revision: str) -> str:
    """PVC restored from a snapshot for ``revision`` (a DNS subdomain; revision names are ≤63)."""
    return f"{revision}-model"


def model_pvc(ref: ModelRef, revision: str, meta: dict[str, Any]) -> dict[str, Any] | None:
    """The revision's own model PVC: restored from the TrainingJob snapshot, or the cache a uri is
    fetched into; None for other sources."""
    if ref.snapshot is None and not ref.cached:
        return None
    spec: dict[str, Any] = {
        # Every replica, on any node, mounts it (read-only in the pod): the same access mode as the
        # checkpoint volume a snapshot came from; shared by the fetch Job and the pods for a cache.
        "accessModes": list(ref.access_modes),
        "resources": {"requests": {"storage": ref.claim_size}},
    }
    if ref.snapshot is not None:
        spec["dataSource"] = {"apiGroup": SNAPSHOT_GROUP, "kind": "VolumeSnapshot", "name": ref.snapshot}
    if ref.storage_class:
        spec["storageClassName"] = ref.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {**meta, "name": model_claim_name(revision)},
        "spec": spec,
    }


_S3 = 's5cmd cp "${MODEL_URI%/}/*" /model/'
_GS = 'gcloud storage cp -r "${MODEL_URI%/}/*" /model/'
_HTTPS = (
    'case "$MODEL_URI" in *.tar.gz|*.tgz) curl -fsSL --retry 5 "$MODEL_URI" | tar -xz -C /model ;; '
    '*) curl -fsSL --retry 5 -o "/model/$(basename "${MODEL_URI%%\\?*}")" "$MODEL_URI" ;; esac'
)
_HF = (
    "python -c \""
    "import os; from huggingface_hub import snapshot_download; "
    "repo, _, rev = os.environ['MODEL_URI'][len('hf://'):].partition('@'); "
    "snapshot_download(repo_id=repo, revision=rev or None, local_dir='/model')\""
)
# A fetch Job that ran before (a retry, a re-created Job) finds the marker and is done.
_ONCE = f'[ -f /model/{FETCHED_MARKER} ] && exit 0; set -e; '
_MARK = f" && touch /model/{FETCHED_MARKER}"
_WAIT = (
    f'echo "waiting for the model fetch Job"; until [ -f /model/{FETCHED_MARKER} ]; do sleep 5; done'
)


def _downloader(uri: str) -> tuple[str, list[str]]:
    scheme = uri.split("://", 1)[0]
    if scheme == "s3":
        return S5CMD_IMAGE, ["/bin/sh", "-c", _S3]
    if scheme == "gs":
        return GCLOUD_IMAGE, ["/bin/sh", "-c", _GS]
    if scheme in ("http", "https"):
        return CURL_IMAGE, ["/bin/sh", "-c", _HTTPS]
    if scheme == "hf":
        return HF_IMAGE, ["/bin/sh", "-c", _HF]
    raise ValueError(f"spec.model.uri: unsupported scheme {scheme!r}")


def _download_container(
    ref: ModelRef, env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None, name: str
) -> dict[str, Any]:
    assert ref.uri is not None
    image, command = _downloader(ref.uri)
    if ref.cached:
        command = [*command[:-1], _ONCE + command[-1] + _MARK]
    # Env names must be unique (server-side apply refuses duplicates): the user's HOME wins over
    # the default, while MODEL_URI is always spec.model.uri's, the one source of the model.
    user = [dict(e) for e in env if e["name"] != "MODEL_URI"]
    home = [] if any(e["name"] == "HOME" for e in user) else [{"name": "HOME", "value": "/tmp"}]
    return {
        "name": name,
        "image": image,
        "command": command,
        "env": [*user, {"name": "MODEL_URI", "value": ref.uri}, *home],
        **({"envFrom": [dict(e) for e in env_from]} if env_from else {}),
        "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT}],
        "resources": copy.deepcopy(DOWNLOAD_RESOURCES),
        # Capstan picked the image (root by default in most): it runs as the reference UID, HOME=/tmp.
        "securityContext": container_security_context(run_as=REFERENCE_UID),
    }


def fetch_job(
    ref: ModelRef,
    revision: str,
    meta: dict[str, Any],
    env: list[dict[str, Any]],
    env_from: list[dict[str, Any]] | None = None,
) -> dict[str, Any] | None:
    """The Job that fetches a cached uri into the revision's PVC once (None when not cached)."""
    if not ref.cached:
        return None
    claim = {"name": VOLUME, "persistentVolumeClaim": {"claimName": model_claim_name(revision)}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {**meta, "name": fetch_job_name(revision)},
        "spec": {
            "backoffLimit": 6,
            "template": {
                # Not the revision's selector labels: its Services and canary analysis must not pick
                # up the fetch pod.
                "metadata": {"labels": {k: v for k, v in (meta.get("labels") or {}).items()
                                        if k.startswith("app.kubernetes.io/")}},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"},
                                        "fsGroup": REFERENCE_UID},
                    "containers": [_download_container(ref, env, env_from, "fetch")],
                    "volumes": [claim],
                },
            },
        },
    }


def fetch_job_name(revision: str) -> str:
    """The fetch Job of a cached revision."""
    return f"{revision}-fetch"


def pod_parts(
    ref: ModelRef, revision: str, env: list[dict[str, Any]], env_from: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Volumes, the server's mounts and init containers that put the model at ``ref.path``.

    ``env`` and ``env_from``: the server's own (spec.env, and the template's server container's,
    Secrets included), which the download gets too (a model hub's token)."""
    mount = {"name": VOLUME, "mountPath": MOUNT, "readOnly": True}
    if ref.claim is not None:
        volume = {"name": VOLUME, "persistentVolumeClaim": {"claimName": ref.claim, "readOnly": True}}
        return {"volumes": [volume], "mounts": [mount], "init": []}
    if ref.snapshot is not None or ref.cached:
        claim = model_claim_name(revision)
        volume = {"name": VOLUME, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        init: list[dict[str, Any]] = []
        if ref.cached:  # the fetch Job fills the claim; start the server once it is whole
            init = [{
                "name": "model-wait",
                "image": CURL_IMAGE,
                "command": ["/bin/sh", "-c", _WAIT],
                "volumeMounts": [dict(mount)],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
                "securityContext": container_security_context(run_as=REFERENCE_UID),
            }]
        return {"volumes": [volume], "mounts": [mount], "init": init}
    download = _download_container(ref, env, env_from, "model-download")
    return {"volumes": [{"name": VOLUME, "emptyDir": {}}], "mounts": [mount], "init": [download]}
