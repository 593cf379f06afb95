"""Admission checks the CRD schema cannot express: pure functions, no Kubernetes client.

:func:`validate` takes the object under review (a plain dict, as in an AdmissionReview) and the
cluster's Node dicts, and returns one ``field.path: what is wrong; how to fix it`` line per
problem (empty list: admit). It runs, in order:

1. everything pydantic says about the object (:func:`capstan.api.loading.parse_object`): types,
   enums, quantities, ranges and the cross-field rules that are also CEL in the CRD;
2. checks against the cluster's nodes: a worker that no node can hold, a tensor-parallel replica
   wider than any NVLink domain, a pod bigger than any node, a ``Required`` gang or multi-host
   replica wider than any domain of its ``maxDomain``;
3. rollout steps whose weights do not strictly increase (the canary only ever gains traffic);
4. ``spec.argsTemplate`` of the custom runtime: unknown template variables and render errors;
5. ``spec.rollout.analysis.queries``: placeholders and PromQL syntax (:mod:`capstan.serving.promql`).

Node-based checks are skipped when no node has any ``nvidia.com/gpu`` allocatable (an empty
cluster or a GPU pool scaled to zero: the job will wait in the queue instead) and when the object
carries the annotation ``capstan.dev/skip-capacity-check: "true"`` (node pools that autoscale to
bigger machines than exist right now).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from capstan.api.loading import InvalidObject, parse_object
from capstan.api.modelserving import ModelServing, capstan_target_fits
from capstan.api.trainingjob import TrainingJob, TrainingJobSpec
from capstan.fields import dig
from capstan.labels import GPU_RESOURCE, SKIP_CAPACITY_ANNOTATION
from capstan.security import is_reference_image
from capstan.serving.promql import query_problem
from capstan.topology.inventory import parse_count
from capstan.topology.levels import DEFAULT_LEVELS, TopologyLevels

#: Variables a custom runtime's argsTemplate may use (same list as capstan.serving.runtimes).
TEMPLATE_VARIABLES = (
    "model_path", "port", "tensor_parallel", "max_model_len", "name", "pipeline_parallel", "nodes",
)


def validate(
    body: Any,
    nodes: Sequence[Mapping[str, Any]] = (),
    levels: TopologyLevels = DEFAULT_LEVELS,
    old: Any = None,
    keda: bool | None = None,
    inference: bool | None = None,
    endpoint_pickers: bool = True,
    lws: bool | None = None,
) -> list[str]:
    """Every reason to reject ``body`` (a TrainingJob or ModelServing dict); [] admits it.
    ``old``: the stored object of an update, whose immutable fields ``body`` must keep.
    ``keda``: whether the cluster serves KEDA's ScaledObject (None: unknown, not checked);
    without it a ModelServing cannot scale to zero. ``inference``: whether it serves InferencePool
    and HTTPRoute (None: unknown); without them, or without ``endpoint_pickers`` (the operator may
    create pickers), ``routing.inferencePool: Required`` is refused. ``lws``: whether it serves
    LeaderWorkerSet (None: unknown); without it multi-host replicas cannot be autoscaled.

    Never raises: any value (a list, a string, fields of the wrong type) gets errors naming where.
    """
    # The status is the operator's (written through /status, which this webhook does not see);
    # a spec change must not be refused because of it.
    obj = {k: v for k, v in body.items() if k != "status"} if isinstance(body, Mapping) else body
    try:
        resource = parse_object(obj)
    except InvalidObject as exc:
        errors = [_with_spec_hint(e) for e in exc.errors]
        # Checks that need only a few fields still run, so one round trip shows every problem.
        errors += _raw_checks(obj, errors)
        return _dedupe(errors)
    errors = _immutable_changes(old, obj)
    check_nodes = bool(nodes) and not _skip_capacity(resource.metadata.annotations)
    if isinstance(resource, TrainingJob):
        if check_nodes:
            errors += _trainingjob_capacity(resource, nodes, levels)
        errors += _fine_tune_targets(resource)
    else:
        if check_nodes:
            errors += _serving_capacity(resource, nodes, levels)
        errors += _rollout_weights([s.weight for s in resource.spec.rollout.steps])
        if keda is not None and (problem := resource.spec.scale_to_zero_problem(keda)):
            errors.append(problem)
        if lws is not None and (problem := resource.spec.multi_host_problem(lws)):
            errors.append(problem)
        served = True if inference is None else inference
        if problem := resource.spec.inference_pool_problem(served, endpoint_pickers):
            errors.append(problem)
        if resource.spec.args_template is not None:
            errors += args_template_errors(resource.spec.args_template)
        errors += _query_errors(resource)
    return _dedupe(errors)


def _query_errors(ms: ModelServing) -> list[str]:
    analysis = ms.spec.rollout.analysis
    queries = analysis.queries if analysis is not None else []
    return [
        f"spec.rollout.analysis.queries[{i}].query: {problem}"
        for i, q in enumerate(queries)
        if (problem := query_problem(q.query)) is not None
    ]


def _fine_tune_targets(job: TrainingJob) -> list[str]:
    """LoRA target modules the reference trainer's GPT does not have (known only for its image)."""
    ft = job.spec.fine_tune
    if ft is None or ft.lora is None or not is_reference_image(job.spec.image):
        return []
    return [f"spec.fineTune.lora.targetModules[{i}]: {t!r} is no linear layer of the reference trainer's "
            "GPT; use qkv, attn.proj, fc, mlp.proj or proj"
            for i, t in enumerate(ft.lora.target_modules) if not capstan_target_fits(t)]


def _immutable_changes(old: Any, new: Mapping[str, Any]) -> list[str]:
    """The immutable fields ``new`` changes (as the CRD's transition rules say; mirrored here for
    ``validate`` without a server). Only TrainingJobs have any."""
    if not isinstance(old, Mapping) or new.get("kind") != "TrainingJob":
        return []
    old_spec, new_spec = old.get("spec"), new.get("spec")
    if not isinstance(old_spec, Mapping) or not isinstance(new_spec, Mapping):
        return []
    return [f"spec{rule.field}: {rule.message}" for rule in TrainingJobSpec.immutable
            if rule.changed(old_spec, new_spec)]


def _dedupe(errors: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(errors))


def _skip_capacity(annotations: Mapping[str, str]) -> bool:
    return str(annotations.get(SKIP_CAPACITY_ANNOTATION, "")).lower() == "true"


_REWORD = (
    ("Input should be greater than or equal to ", "must be at least "),
    ("Input should be less than or equal to ", "must be at most "),
    ("Input should be greater than ", "must be more than "),
    ("Input should be less than ", "must be less than "),
    ("Input should be ", "must be "),
)


def _with_spec_hint(line: str) -> str:
    """Make pydantic's wording actionable where it is terse."""
    for old, new in _REWORD:
        if f": {old}" in line:
            line = line.replace(f": {old}", f": {new}", 1)
            break
    if line.startswith("spec: ") and ": " in line[6:]:
        # A cross-field rule on the spec reports "spec: field: message": name the field fully.
        field, _, msg = line[6:].partition(": ")
        if field and " " not in field:
            return f"spec.{field}: {msg}"
    return line


# --- checks on the raw dict (used when the model does not parse) --------------------------------


def _raw_checks(obj: Any, already: list[str]) -> list[str]:
    if not isinstance(obj, Mapping):
        return []
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return []
    errors: list[str] = []
    if obj.get("kind") == "ModelServing":
        steps = dig(spec, "rollout", "steps")
        if isinstance(steps, list):
            weights = [s.get("weight") for s in steps if isinstance(s, Mapping)]
            if all(isinstance(w, int) and not isinstance(w, bool) for w in weights):
                errors += _rollout_weights(weights)  # type: ignore[arg-type]
        if spec.get("runtime") == "custom" and not spec.get("image"):
            errors.append("spec.image: runtime custom needs the server image; set spec.image")
        template = spec.get("argsTemplate")
        if isinstance(template, str):
            errors += args_template_errors(template)
    return [e for e in errors if e not in already]


# --- capacity -------------------------------------------------------------------------------------


def _gpus(node: Mapping[str, Any]) -> int:
    return parse_count(dig(node, "status", "allocatable", GPU_RESOURCE))


def _name(node: Mapping[str, Any]) -> str:
    return str(dig(node, "metadata", "name") or "")


def domain_sizes(nodes: Sequence[Mapping[str, Any]], levels: TopologyLevels, level: str) -> dict[str, int]:
    """Allocatable GPUs per domain of ``level``; a node without the level's label (or any
    narrower one) is its own domain, as in :func:`capstan.topology.build_inventory`."""
    idx = levels.index(level)
    nlev = len(levels)
    sizes: dict[str, int] = defaultdict(int)
    for node in nodes:
        labels = dig(node, "metadata", "labels") or {}
        raw = [str(labels[lv.label]) if labels.get(lv.label) else None for lv in levels]
        # Same keys as the inventory: the label path from the widest level down to this one, so
        # two racks with one label value in different zones stay apart.
        keys: list[str] = []
        for li in range(idx + 1):
            if raw[li] is None:
                keys.append(keys[-1] if li else f"node={_name(node)}")
            else:
                wider = range(nlev - 1, li - 1, -1)
                keys.append("/".join(f"{levels.levels[j].name}={raw[j]}" for j in wider if raw[j]))
        sizes[keys[idx]] += _gpus(node)
    return dict(sizes)


def _largest_node(nodes: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    best = max(nodes, key=lambda n: (_gpus(n), _name(n)))
    return _gpus(best), _name(best)


def _trainingjob_capacity(
    job: TrainingJob, nodes: Sequence[Mapping[str, Any]], levels: TopologyLevels
) -> list[str]:
    spec = job.spec
    if spec.gpus_per_worker == 0:
        return []
    most, where = _largest_node(nodes)
    if most == 0:
        return []  # no GPU node at all (scaled to zero): the job queues instead
    errors = []
    if spec.gpus_per_worker > most:
        errors.append(
            f"spec.gpusPerWorker: {spec.gpus_per_worker} GPUs per worker, but the largest node "
            f"({where}) has {most} allocatable {GPU_RESOURCE}; use at most {most} GPUs per worker "
            f"and more workers (e.g. workers: {-(-spec.total_gpus // most)}, gpusPerWorker: {most})"
        )
    elif spec.topology.policy == "Required" and spec.topology.max_domain in levels.names:
        level = spec.topology.max_domain
        sizes = domain_sizes(nodes, levels, level)
        biggest = max(sizes.values(), default=0)
        if spec.total_gpus > biggest:
            errors.append(
                f"spec.topology.maxDomain: the gang needs {spec.total_gpus} GPUs inside one {level} "
                f"domain (policy Required), but the largest {level} domain has {biggest}; widen "
                f"maxDomain, use policy Preferred, or request fewer GPUs"
            )
    return errors


def _serving_capacity(
    ms: ModelServing, nodes: Sequence[Mapping[str, Any]], levels: TopologyLevels
) -> list[str]:
    spec = ms.spec
    if not spec.gpu:
        return []
    most, where = _largest_node(nodes)
    if most == 0:
        return []
    nvlink = levels.levels[0].name
    domain = max(max(domain_sizes(nodes, levels, nvlink).values(), default=0), most)
    if spec.tensor_parallel > domain:
        return [
            f"spec.tensorParallel: {spec.tensor_parallel} GPUs per replica must share one NVLink "
            f"domain, but the largest NVLink domain has {domain} GPUs (largest node: {where}, "
            f"{most}); use tensorParallel <= {domain} and more replicas"
        ]
    if spec.pod_gpus > most:
        field = "spec.gpusPerPod" if spec.gpus_per_pod else "spec.tensorParallel"
        fits = max(d for d in range(1, most + 1) if spec.replica_gpus % d == 0)
        return [
            f"{field}: {spec.pod_gpus} GPUs in one pod, but the largest node ({where}) has {most} "
            f"allocatable {GPU_RESOURCE}; set gpusPerPod: {fits} (a replica of "
            f"{spec.replica_gpus // fits} pods, a leader and workers)"
        ]
    place = spec.placement
    if spec.pods_per_replica > 1 and place.policy == "Required" and place.max_domain in levels.names:
        biggest = max(domain_sizes(nodes, levels, place.max_domain).values(), default=0)
        if spec.replica_gpus > biggest:
            return [
                f"spec.topology.maxDomain: a replica needs {spec.replica_gpus} GPUs inside one "
                f"{place.max_domain} domain (policy Required), but the largest {place.max_domain} domain "
                f"has {biggest}; widen maxDomain, use policy Preferred, or use fewer GPUs per replica"
            ]
    return []


# --- rollout --------------------------------------------------------------------------------------


def _rollout_weights(weights: Sequence[int]) -> list[str]:
    for i in range(1, len(weights)):
        if weights[i] <= weights[i - 1]:
            return [
                f"spec.rollout.steps[{i}].weight: {weights[i]} does not exceed the previous step's "
                f"{weights[i - 1]}; canary weights must strictly increase (e.g. 10, 50, 100)"
            ]
    return []


# --- argsTemplate ---------------------------------------------------------------------------------


def args_template_errors(template: str) -> list[str]:
    """Problems of a custom runtime's argsTemplate, each naming ``spec.argsTemplate``.

    Uses ``capstan.serving.runtimes.validate_args_template`` (the renderer's own checks) when that
    module is present; otherwise parses with jinja2 and reports unknown variables.
    """
    try:
        from capstan.serving.runtimes import validate_args_template
    except ImportError:
        return _jinja_errors(template)
    return [e if e.startswith("spec.argsTemplate") else f"spec.argsTemplate: {e}"
            for e in validate_args_template(template)]


def _jinja_errors(template: str) -> list[str]:
    import jinja2
    from jinja2 import meta

    try:
        ast = jinja2.Environment(autoescape=False).parse(template)
    except jinja2.TemplateSyntaxError as exc:
        return [f"spec.argsTemplate: line {exc.lineno}: {exc.message}"]
    unknown = sorted(meta.find_undeclared_variables(ast) - set(TEMPLATE_VARIABLES))
    if unknown:
        return [
            f"spec.argsTemplate: unknown variable(s) {', '.join(unknown)}; "
            f"known: {', '.join(TEMPLATE_VARIABLES)}"
        ]
    return []
