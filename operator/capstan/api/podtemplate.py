"""``spec.template`` of a TrainingJob: a pod template merged over the generated worker pod.

The template is a real core/v1 pod template (its ``spec`` schema is upstream's PodSpec, see
:mod:`capstan.api.podspec`). What it may add: labels and annotations, volumes, init containers,
sidecar containers, image pull secrets, a priority class, pod and container security settings,
affinity and tolerations; a container named ``worker`` is merged into the worker container
(volumeMounts, env with ``valueFrom``, envFrom, resources beyond GPUs, probes, ...).

What it may not set are the fields Capstan owns (placement, rendezvous, GPU and RDMA resources,
the checkpoint and /dev/shm mounts, the hardened security defaults) and fields the spec already
has (``image`` is ``spec.image``): :func:`template_problems` names each such field with what to
use instead. The checks here need only the template; those that compare it with the rest of the
spec (:func:`spec_conflicts`) are called by the TrainingJob spec itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from functools import cache
from typing import Any

from capstan.api.common import QUANTITY_PATTERN
from capstan.api.k8s_names import env_var_name_errors
from capstan.api.podspec import DROPPED_FIELDS, pod_spec_schema

#: Name of the container Capstan generates; a template container of this name is merged into it.
WORKER_CONTAINER = "worker"
#: Volumes and mounts of the generated pod.
RESERVED_VOLUMES = ("dshm", "checkpoints", "podinfo")
SHM_PATH = "/dev/shm"
#: Ports of the worker container.
RESERVED_PORT_NAMES = ("rdzv", "metrics")
#: Environment Capstan sets for the rendezvous and its own bookkeeping (NCCL_* and the user's
#: spec.env are not owned: the template may override them).
OWNED_ENV = frozenset(
    {
        *(p + k for p in ("", "PET_") for k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                                                 "NPROC_PER_NODE")),
        "PET_RDZV_ID",
    }
)
OWNED_ENV_PREFIX = "CAPSTAN_"
#: Label and annotation prefixes Capstan (and Kueue, through Capstan) write on worker pods.
OWNED_META_PREFIXES = ("capstan.dev/", "kueue.x-k8s.io/", "app.kubernetes.io/")
MULTUS_ANNOTATION = "k8s.v1.cni.cncf.io/networks"

#: Pod spec fields Capstan owns, with why.
OWNED_POD_FIELDS: dict[str, str] = {
    "nodeName": "Capstan's placement chooses each worker's node",
    "nodeSelector": "use spec.nodeSelector (the placement reads it)",
    "hostname": "Capstan sets it to the worker's rendezvous name",
    "subdomain": "Capstan sets it to the gang's headless Service",
    "restartPolicy": "Capstan restarts the gang as a whole (pods run with Never)",
    "priority": "the API server sets it from priorityClassName",
    "serviceAccountName": "use spec.serviceAccountName",
    "serviceAccount": "use spec.serviceAccountName",
    "automountServiceAccountToken": "Capstan mounts the token only when spec.serviceAccountName is set",
}
OWNED_POD_SECURITY: dict[str, str] = {
    "runAsNonRoot": "Capstan's pods always run with runAsNonRoot: true",
    "seccompProfile": "Capstan's pods always run with seccomp RuntimeDefault",
    "runAsUser": "use spec.securityContext.runAsUser",
    "runAsGroup": "use spec.securityContext.runAsGroup",
    "fsGroup": "use spec.securityContext.fsGroup",
}
OWNED_CONTAINER_SECURITY: dict[str, str] = {
    "privileged": "Capstan's containers never run privileged",
    "allowPrivilegeEscalation": "Capstan's containers never allow privilege escalation",
    "capabilities": "Capstan drops every capability (adding IPC_LOCK only for RDMA)",
}
#: Fields of the worker container that the spec already has.
WORKER_SPEC_FIELDS: dict[str, str] = {
    "image": "use spec.image",
    "command": "use spec.command",
    "args": "use spec.args",
    "imagePullPolicy": "use spec.imagePullPolicy",
}
GPU_RESOURCE = "nvidia.com/gpu"

_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_PROBLEMS = 20


def path_of(parts: Any) -> str:
    """``.a.b[0].c`` from path parts (str keys, int indices)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)):
            out += f".{part}"
        else:
            out += f"[{str(part)!r}]"
    return out


@cache
def _validator() -> Any:
    import jsonschema

    def strict(node: Any) -> Any:
        # The API server prunes unknown fields silently; here they are named (typos, wrong nesting).
        if isinstance(node, dict):
            out = {k: strict(v) for k, v in node.items()}
            if "properties" in node and "additionalProperties" not in node:
                out["additionalProperties"] = False
            return out
        if isinstance(node, list):
            return [strict(v) for v in node]
        return node

    return jsonschema.Draft202012Validator(strict(pod_spec_schema()))


def _schema_problems(spec: Mapping[str, Any]) -> list[str]:
    out = []
    for err in sorted(_validator().iter_errors(spec), key=lambda e: list(map(str, e.absolute_path))):
        where = path_of(err.absolute_path)
        if err.validator == "additionalProperties":
            known = err.schema.get("properties", {})
            for name in sorted(k for k in err.instance if k not in known):
                why = DROPPED_FIELDS.get(name, "unknown field (check spelling and indentation)")
                out.append(f"{where}{path_of([name])}: {why}")
        elif err.validator == "type":
            out.append(f"{where}: must be {_a(err.validator_value)}, got {_a(_json_type(err.instance))}")
        elif err.validator == "required":
            out += [f"{where}{path_of([name])}: required field is missing"
                    for name in err.validator_value if name not in err.instance]
        elif err.validator == "anyOf":
            out.append(f"{where}: must be an integer or a string")
        else:
            out.append(f"{where}: {err.message[:200]}")
    return out


def _a(kind: Any) -> str:
    name = str(kind)
    return f"an {name}" if name[:1] in "aeiou" else f"a {name}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _ints(node: Any, where: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], int]]:
    if isinstance(node, bool):
        return
    if isinstance(node, int):
        yield where, node
    elif isinstance(node, Mapping):
        for k, v in node.items():
            yield from _ints(v, (*where, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _ints(v, (*where, i))


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, int, Mapping[str, Any]]]:
    for key in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(key) or []):
            if isinstance(c, Mapping):
                yield key, i, c


def _container_problems(key: str, i: int, c: Mapping[str, Any]) -> list[str]:
    at = f".{key}[{i}]"
    out = []
    name = c.get("name")
    is_worker = key == "containers" and name == WORKER_CONTAINER
    if isinstance(name, str) and (not _DNS_LABEL_RE.match(name) or len(name) > 63):
        out.append(f"{at}.name: {name!r} is not a DNS-1123 label (lowercase letters, digits and '-')")
    if is_worker:
        out += [f"{at}.{f}: {why}" for f, why in WORKER_SPEC_FIELDS.items() if f in c]
    elif "image" not in c:
        out.append(f"{at}.image: required for a container other than {WORKER_CONTAINER!r}")
    security = c.get("securityContext")
    if isinstance(security, Mapping):
        out += [f"{at}.securityContext.{f}: {why}" for f, why in OWNED_CONTAINER_SECURITY.items()
                if f in security]
    resources = c.get("resources")
    if isinstance(resources, Mapping):
        for part in ("requests", "limits"):
            amounts = resources.get(part)
            if not isinstance(amounts, Mapping):
                continue
            for res, amount in amounts.items():
                where = f"{at}.resources.{part}{path_of([res])}"
                if res == GPU_RESOURCE:
                    out.append(f"{where}: use spec.gpusPerWorker (placement counts GPUs)")
                elif str(res).startswith("rdma/"):
                    out.append(f"{where}: use spec.network.rdma and spec.network.rdmaResource")
                elif isinstance(amount, str) and not _QUANTITY_RE.match(amount):
                    out.append(f"{where}: {amount!r} is not a Kubernetes quantity (e.g. 4, '500m', '256Gi')")
    for j, mount in enumerate(c.get("volumeMounts") or []):
        if not isinstance(mount, Mapping):
            continue
        if mount.get("name") in RESERVED_VOLUMES:
            out.append(f"{at}.volumeMounts[{j}].name: {mount['name']!r} is Capstan's own volume")
        elif is_worker and mount.get("mountPath") == SHM_PATH:
            out.append(f"{at}.volumeMounts[{j}].mountPath: Capstan mounts /dev/shm (size: "
                       "spec.resources.sharedMemory)")
    for j, env in enumerate(c.get("env") or []):
        if not isinstance(env, Mapping) or not isinstance(env.get("name"), str):
            continue
        env_name = env["name"]
        if is_worker and (env_name in OWNED_ENV or env_name.startswith(OWNED_ENV_PREFIX)):
            out.append(f"{at}.env[{j}].name: {env_name} is set by Capstan for the rendezvous")
        else:
            out += [f"{at}.env[{j}].name: {e}" for e in env_var_name_errors(env_name)]
    if is_worker:
        for j, port in enumerate(c.get("ports") or []):
            if isinstance(port, Mapping) and port.get("name") in RESERVED_PORT_NAMES:
                out.append(f"{at}.ports[{j}].name: {port['name']!r} is a port Capstan declares")
    return out


def _meta_problems(meta: Mapping[str, Any]) -> list[str]:
    out = []
    for part in ("labels", "annotations"):
        for key in meta.get(part) or {}:
            where = f".metadata.{part}[{key!r}]"
            if any(key.startswith(p) for p in OWNED_META_PREFIXES):
                out.append(f"{where}: keys under {', '.join(OWNED_META_PREFIXES)} are Capstan's")
            elif key == MULTUS_ANNOTATION:
                out.append(f"{where}: use spec.network.networks")
    return out


def template_problems(template: Mapping[str, Any]) -> list[str]:
    """Every problem of a pod template on its own, each as ``.path.in.template: reason`` ([]: none).

    Checks the upstream PodSpec schema (types, required fields, unknown fields), that no integer is
    negative (no PodSpec field takes one), quantities, names, and that no Capstan-owned field is set.
    """
    out: list[str] = []
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    out += _meta_problems(meta)
    schema = [f".spec{p}" for p in _schema_problems(spec)]
    if schema:
        return (out + schema)[:MAX_PROBLEMS]  # the checks below assume the types are right
    out += [f".spec{path_of(where)}: must not be negative" for where, value in _ints(spec) if value < 0]
    out += [f".spec.{f}: {why}" for f, why in OWNED_POD_FIELDS.items() if f in spec]
    security = spec.get("securityContext") or {}
    out += [f".spec.securityContext.{f}: {why}" for f, why in OWNED_POD_SECURITY.items() if f in security]
    node_affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    if "requiredDuringSchedulingIgnoredDuringExecution" in node_affinity:
        out.append(
            ".spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution: Capstan's "
            "placement pins workers through it; use spec.nodeSelector (preferred terms, podAffinity and "
            "podAntiAffinity are merged)"
        )
    names: dict[str, str] = {}
    for key, i, c in _containers(spec):
        out += [f".spec{p}" for p in _container_problems(key, i, c)]
        name = c.get("name")
        if isinstance(name, str):
            if name in names:
                out.append(f".spec.{key}[{i}].name: {name!r} is also {names[name]}")
            names.setdefault(name, f".spec.{key}[{i}]")
    if spec.get("initContainers") and any(c.get("name") == WORKER_CONTAINER
                                          for c in spec["initContainers"]):
        out.append(f".spec.initContainers: {WORKER_CONTAINER!r} is the name of the worker container")
    volumes: set[str] = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        name = vol.get("name")
        size = (vol.get("emptyDir") or {}).get("sizeLimit")
        if isinstance(size, str) and not _QUANTITY_RE.match(size):
            out.append(f".spec.volumes[{i}].emptyDir.sizeLimit: {size!r} is not a Kubernetes quantity "
                       "(e.g. '64Gi')")
        if name in RESERVED_VOLUMES:
            out.append(f".spec.volumes[{i}].name: {name!r} is Capstan's own volume")
        elif name in volumes:
            out.append(f".spec.volumes[{i}].name: {name!r} appears twice")
        volumes.add(name)
    for key, i, c in _containers(spec):
        for j, mount in enumerate(c.get("volumeMounts") or []):
            name = mount.get("name")
            if name not in volumes and name not in RESERVED_VOLUMES:
                out.append(f".spec.{key}[{i}].volumeMounts[{j}].name: no volume {name!r} in the template")
    return out[:MAX_PROBLEMS]


def worker_container(template: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The template's ``worker`` container ({} when there is none)."""
    spec = (template or {}).get("spec") or {}
    return next((c for c in spec.get("containers") or [] if c.get("name") == WORKER_CONTAINER), {})


def template_tolerations(template: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Tolerations the template adds to the spec's."""
    spec = (template or {}).get("spec") or {}
    return [dict(t) for t in spec.get("tolerations") or []]
