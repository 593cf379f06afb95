"""``spec.template`` of a TrainingJob or a ModelServing: a pod template merged over the generated pod.

The template is a real core/v1 pod template (its ``spec`` schema is upstream's PodSpec, see
:mod:`capstan.api.podspec`). What it may add: labels and annotations, volumes, init containers,
sidecar containers, image pull secrets, a priority class, pod and container security settings,
affinity and tolerations; a container named like the generated one (``worker`` in a TrainingJob,
``server`` in a ModelServing) is merged into it (volumeMounts, env with ``valueFrom``, envFrom,
resources beyond GPUs, ...). :func:`capstan.podmerge.merge_template` does the merge.

What it may not set are the fields Capstan owns (placement, rendezvous, GPU and RDMA resources,
its own volumes and mounts, the runtime's probes, the hardened security defaults) and fields the
spec already has (``image`` is ``spec.image``): :func:`template_problems` names each such field
with what to use instead; :class:`TemplateRules` says, per kind, which they are
(:data:`TRAINING`, :data:`SERVING`). The checks here need only the template; those that compare
it with the rest of the spec are made by each spec model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, ClassVar, Self

from pydantic import Field, WithJsonSchema, model_validator

from capstan.api.common import QUANTITY_PATTERN, ApiModel
from capstan.api.k8s_names import LabelValue, QualifiedName, env_var_name_errors
from capstan.api.podspec import DROPPED_FIELDS, pod_spec_schema
from capstan.fields import dig
from capstan.labels import GPU_RESOURCE, MULTUS_ANNOTATION, OWNED_META_PREFIXES

SHM_PATH = "/dev/shm"
OWNED_ENV_PREFIX = "CAPSTAN_"

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


@dataclass(frozen=True)
class TemplateRules:
    """What one kind's pod template may not set: the generated pod's own names and fields.

    ``container``: the generated container a template container of that name is merged into.
    ``container_fields``: fields of that container the spec already has (with what to use).
    ``resources``: resource name prefixes the template may not request (with what to use).
    ``owned_env``/``env_reason``: environment Capstan sets in the container (and why).
    ``meta_keys``: label or annotation keys (or prefixes ending in ``/``) with what to use instead.
    """

    kind: str
    container: str
    volumes: tuple[str, ...]
    port_names: tuple[str, ...]
    init_containers: tuple[str, ...]
    pod_fields: Mapping[str, str]
    container_fields: Mapping[str, str]
    resources: Mapping[str, str]
    owned_env: frozenset[str]
    env_reason: str
    meta_keys: Mapping[str, str]
    affinity_reason: str
    shm_reason: str


#: Environment Capstan sets for the rendezvous and its own bookkeeping (NCCL_* and the user's
#: spec.env are not owned: the template may override them).
OWNED_ENV = frozenset(
    {
        *(p + k for p in ("", "PET_") for k in ("MASTER_ADDR", "MASTER_PORT", "NNODES", "NODE_RANK",
                                                 "NPROC_PER_NODE")),
        "PET_RDZV_ID",
    }
)

#: A TrainingJob's worker pods.
TRAINING = TemplateRules(
    kind="worker",
    container="worker",
    volumes=("dshm", "checkpoints", "podinfo", "hostfile"),
    port_names=("rdzv", "metrics"),
    init_containers=(),
    pod_fields={
        "nodeName": "Capstan's placement chooses each worker's node",
        "nodeSelector": "use spec.nodeSelector (the placement reads it)",
        "hostname": "Capstan sets it to the worker's rendezvous name",
        "subdomain": "Capstan sets it to the gang's headless Service",
        "restartPolicy": "Capstan restarts the gang as a whole (pods run with Never)",
        "priority": "the API server sets it from priorityClassName",
        "serviceAccountName": "use spec.serviceAccountName",
        "serviceAccount": "use spec.serviceAccountName",
        "automountServiceAccountToken": "Capstan mounts the token only when spec.serviceAccountName is set",
    },
    container_fields={
        "image": "use spec.image",
        "command": "use spec.command",
        "args": "use spec.args",
        "imagePullPolicy": "use spec.imagePullPolicy",
    },
    resources={
        GPU_RESOURCE: "use spec.gpusPerWorker (placement counts GPUs)",
        "rdma/": "use spec.network.rdma and spec.network.rdmaResource",
    },
    owned_env=OWNED_ENV,
    env_reason="is set by Capstan for the rendezvous",
    meta_keys={
        **{p: f"keys under {', '.join(OWNED_META_PREFIXES)} are Capstan's" for p in OWNED_META_PREFIXES},
        MULTUS_ANNOTATION: "use spec.network.networks",
    },
    affinity_reason="Capstan's placement pins workers through it; use spec.nodeSelector (preferred terms, "
    "podAffinity and podAntiAffinity are merged)",
    shm_reason="Capstan mounts /dev/shm (size: spec.resources.sharedMemory)",
)

_PROBE = "Capstan sets the runtime's probes (the rollout waits on readiness)"
#: A ModelServing's server pods (each revision's Deployment).
SERVING = TemplateRules(
    kind="server",
    container="server",
    volumes=("dshm", "model"),
    port_names=("http",),
    init_containers=("model-download",),
    pod_fields={
        "nodeName": "a Deployment's replicas cannot share one node name; use spec.nodeSelector",
        "nodeSelector": "use spec.nodeSelector",
        "restartPolicy": "a Deployment's pods always run with Always",
        "priority": "the API server sets it from priorityClassName",
        "serviceAccount": "deprecated alias; use serviceAccountName",
        "automountServiceAccountToken": "the servers never call the Kubernetes API: Capstan mounts no "
        "ServiceAccount token (workload-identity tokens are projected volumes, which the template may add)",
    },
    container_fields={
        "image": "use spec.image",
        "command": "use spec.command",
        "args": "Capstan renders the runtime's arguments; use runtime custom with spec.argsTemplate",
        "readinessProbe": _PROBE,
        "livenessProbe": _PROBE,
        "startupProbe": _PROBE,
    },
    resources={GPU_RESOURCE: "use spec.tensorParallel and spec.gpu"},
    owned_env=frozenset(),
    env_reason="is set by Capstan",
    meta_keys={
        **{p: f"keys under {', '.join(OWNED_META_PREFIXES)} are Capstan's" for p in OWNED_META_PREFIXES},
        "prometheus.io/": "Capstan sets the scrape annotations from the runtime",
    },
    affinity_reason="Capstan keeps a tensor-parallel replica on a node that holds it; use spec.nodeSelector "
    "(preferred terms, podAffinity and podAntiAffinity are merged)",
    shm_reason="Capstan mounts /dev/shm for the runtime's shard processes",
)


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


def _container_problems(key: str, i: int, c: Mapping[str, Any], rules: TemplateRules) -> list[str]:
    at = f".{key}[{i}]"
    out = []
    name = c.get("name")
    is_main = key == "containers" and name == rules.container
    if isinstance(name, str) and (not _DNS_LABEL_RE.match(name) or len(name) > 63):
        out.append(f"{at}.name: {name!r} is not a DNS-1123 label (lowercase letters, digits and '-')")
    if is_main:
        out += [f"{at}.{f}: {why}" for f, why in rules.container_fields.items() if f in c]
    elif "image" not in c:
        out.append(f"{at}.image: required for a container other than {rules.container!r}")
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
                owned = next((why for p, why in rules.resources.items() if _matches(str(res), p)), None)
                if owned:
                    out.append(f"{where}: {owned}")
                elif isinstance(amount, str) and not _QUANTITY_RE.match(amount):
                    out.append(f"{where}: {amount!r} is not a Kubernetes quantity (e.g. 4, '500m', '256Gi')")
    for j, mount in enumerate(c.get("volumeMounts") or []):
        if not isinstance(mount, Mapping):
            continue
        if mount.get("name") in rules.volumes:
            out.append(f"{at}.volumeMounts[{j}].name: {mount['name']!r} is Capstan's own volume")
        elif is_main and mount.get("mountPath") == SHM_PATH:
            out.append(f"{at}.volumeMounts[{j}].mountPath: {rules.shm_reason}")
    for j, env in enumerate(c.get("env") or []):
        if not isinstance(env, Mapping) or not isinstance(env.get("name"), str):
            continue
        env_name = env["name"]
        if is_main and (env_name in rules.owned_env or env_name.startswith(OWNED_ENV_PREFIX)):
            out.append(f"{at}.env[{j}].name: {env_name} {rules.env_reason}")
        else:
            out += [f"{at}.env[{j}].name: {e}" for e in env_var_name_errors(env_name)]
    if is_main:
        for j, port in enumerate(c.get("ports") or []):
            if isinstance(port, Mapping) and port.get("name") in rules.port_names:
                out.append(f"{at}.ports[{j}].name: {port['name']!r} is a port Capstan declares")
    return out


def _matches(key: str, owned: str) -> bool:
    """``owned`` is a key, or a prefix when it ends in ``/``."""
    return key.startswith(owned) if owned.endswith("/") else key == owned


def _meta_problems(meta: Mapping[str, Any], rules: TemplateRules) -> list[str]:
    out = []
    for part in ("labels", "annotations"):
        for key in meta.get(part) or {}:
            why = next((why for k, why in rules.meta_keys.items() if _matches(str(key), k)), None)
            if why:
                out.append(f".metadata.{part}[{key!r}]: {why}")
    return out


def template_problems(template: Mapping[str, Any], rules: TemplateRules = TRAINING) -> list[str]:
    """Every problem of a pod template on its own, each as ``.path.in.template: reason`` ([]: none).

    Checks the upstream PodSpec schema (types, required fields, unknown fields), that no integer is
    negative (no PodSpec field takes one), quantities, names, and that no field ``rules`` says
    Capstan owns is set.
    """
    out: list[str] = []
    meta = template.get("metadata") or {}
    spec = template.get("spec") or {}
    out += _meta_problems(meta, rules)
    schema = [f".spec{p}" for p in _schema_problems(spec)]
    if schema:
        return (out + schema)[:MAX_PROBLEMS]  # the checks below assume the types are right
    out += [f".spec{path_of(where)}: must not be negative" for where, value in _ints(spec) if value < 0]
    out += [f".spec.{f}: {why}" for f, why in rules.pod_fields.items() if f in spec]
    security = spec.get("securityContext") or {}
    out += [f".spec.securityContext.{f}: {why}" for f, why in OWNED_POD_SECURITY.items() if f in security]
    node_affinity = dig(spec, "affinity", "nodeAffinity") or {}
    if "requiredDuringSchedulingIgnoredDuringExecution" in node_affinity:
        out.append(".spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution: "
                   + rules.affinity_reason)
    names: dict[str, str] = {}
    for key, i, c in _containers(spec):
        out += [f".spec{p}" for p in _container_problems(key, i, c, rules)]
        name = c.get("name")
        if isinstance(name, str):
            if name in names:
                out.append(f".spec.{key}[{i}].name: {name!r} is also {names[name]}")
            names.setdefault(name, f".spec.{key}[{i}]")
    for i, c in enumerate(spec.get("initContainers") or []):
        if c.get("name") == rules.container:
            out.append(f".spec.initContainers[{i}].name: {rules.container!r} is the name of the "
                       f"{rules.kind} container")
        elif c.get("name") in rules.init_containers:
            out.append(f".spec.initContainers[{i}].name: {c['name']!r} is Capstan's own init container")
    volumes: set[str] = set()
    for i, vol in enumerate(spec.get("volumes") or []):
        name = vol.get("name")
        size = dig(vol, "emptyDir", "sizeLimit")
        if isinstance(size, str) and not _QUANTITY_RE.match(size):
            out.append(f".spec.volumes[{i}].emptyDir.sizeLimit: {size!r} is not a Kubernetes quantity "
                       "(e.g. '64Gi')")
        if name in rules.volumes:
            out.append(f".spec.volumes[{i}].name: {name!r} is Capstan's own volume")
        elif name in volumes:
            out.append(f".spec.volumes[{i}].name: {name!r} appears twice")
        volumes.add(name)
    for key, i, c in _containers(spec):
        for j, mount in enumerate(c.get("volumeMounts") or []):
            name = mount.get("name")
            if name not in volumes and name not in rules.volumes:
                out.append(f".spec.{key}[{i}].volumeMounts[{j}].name: no volume {name!r} in the template")
    return out[:MAX_PROBLEMS]


def main_container(template: Mapping[str, Any] | None, name: str) -> Mapping[str, Any]:
    """The template's container called ``name`` ({} when there is none)."""
    spec = dig(template, "spec") or {}
    return next((c for c in spec.get("containers") or [] if c.get("name") == name), {})


def worker_container(template: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The template's ``worker`` container ({} when there is none)."""
    return main_container(template, TRAINING.container)


def template_tolerations(template: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """Tolerations the template adds to the spec's."""
    spec = dig(template, "spec") or {}
    return [dict(t) for t in spec.get("tolerations") or []]


#: Marks where :mod:`capstan.api.crdgen` puts upstream's PodSpec schema (see capstan.api.podspec).
POD_SPEC_MARKER = "x-capstan-pod-spec"
PodSpecBody = Annotated[
    dict[str, Any],
    WithJsonSchema({"type": "object", POD_SPEC_MARKER: True}),
]


class TemplateMetadata(ApiModel):
    """Labels and annotations the pods get besides Capstan's own."""

    labels: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict, max_length=64, description="Labels of every pod."
    )
    annotations: dict[QualifiedName, Annotated[str, Field(max_length=65536)]] = Field(
        default_factory=dict, max_length=64, description="Annotations of every pod."
    )


class PodTemplate(ApiModel):
    """A pod template merged over a generated pod; subclasses name their :class:`TemplateRules`."""

    template_rules: ClassVar[TemplateRules] = TRAINING

    metadata: TemplateMetadata = Field(
        default_factory=TemplateMetadata, description="Labels and annotations added to every pod."
    )
    spec: PodSpecBody = Field(
        default_factory=dict, description="A core/v1 PodSpec merged over the generated one."
    )

    @model_validator(mode="after")
    def _check_template(self) -> Self:
        template = {"metadata": self.metadata.wire(), "spec": self.spec}
        problems = template_problems(template, self.template_rules)
        if problems:
            # One line per problem, each a path inside the template (see describe_errors).
            raise ValueError("\n".join(problems))
        return self

    def main_container(self) -> Mapping[str, Any]:
        """The template's container merged into the generated one ({} when there is none)."""
        return main_container({"spec": self.spec}, self.template_rules.container)

    def main_container_path(self) -> str:
        """``.template.spec.containers[i]`` of :meth:`main_container`, for error messages."""
        containers = self.spec.get("containers") or []
        return f".template.spec.containers[{containers.index(self.main_container())}]"

    def resource_conflicts(self, cpu: object, memory: object) -> list[str]:
        """The main container's cpu and memory where the spec's ``resources`` sets them too."""
        resources = self.main_container().get("resources") or {}
        out = []
        for part in ("requests", "limits"):
            for res, own in (("cpu", cpu), ("memory", memory)):
                if res in (resources.get(part) or {}) and own is not None:
                    out.append(f"{self.main_container_path()}.resources.{part}.{res}: also set by "
                               f"spec.resources.{res}; set it in one place")
        return out
