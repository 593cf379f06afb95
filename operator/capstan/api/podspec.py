"""The upstream core/v1 PodSpec schema, made structural for the CRD and kept as package data.

``spec.template.spec`` of a TrainingJob is a real PodSpec, so its schema is Kubernetes' own, not a
copy written by hand: :func:`build_schema` takes the JSON schema ``kubernetes-validate`` ships for
:data:`KUBERNETES_VERSION` (the oldest Kubernetes the chart supports, so every field it offers
works on every supported cluster) and turns it into a structural schema the API server accepts:
``$ref`` inlined, ``["T", "null"]`` unions reduced to ``T``, quantities and int-or-strings marked
``x-kubernetes-int-or-string``, and keywords CRDs do not know (``$schema``, patch strategies,
``additionalProperties: false``; the API server prunes unknown fields instead) dropped.
``ephemeralContainers`` is left out (a pod cannot be created with them) and ``containers`` is not
required (a template may only add volumes).

``make crds`` writes the result to ``podspec.schema.json`` beside this module
(:func:`write_schema`); the CRD generator and the runtime checks read that file
(:func:`pod_spec_schema`), so the operator needs no ``kubernetes-validate`` (a development
dependency of 100 MB) at run time, and ``capstan crds --check`` fails when the file is stale.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

from capstan.fields import dig

#: Kubernetes version whose PodSpec the template follows (chart kubeVersion: >=1.29).
KUBERNETES_VERSION = "1.29.0"
SCHEMA_FILE = Path(__file__).with_name("podspec.schema.json")
#: PodSpec fields left out of the template schema, and why (the runtime check names them).
DROPPED_FIELDS = {"ephemeralContainers": "a pod cannot be created with ephemeral containers"}

_INT_OR_STRING = {
    "io.k8s.apimachinery.pkg.api.resource.Quantity",
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString",
}
# JSON-schema and OpenAPI extension keywords a CRD's JSONSchemaProps does not have.
_DROP_KEYS = {
    "$schema",
    "$id",
    "x-kubernetes-patch-merge-key",
    "x-kubernetes-patch-strategy",
    "x-kubernetes-group-version-kind",
    "x-kubernetes-unions",
    "default",
}
_FORMATS = {"int32", "int64", "double", "float", "byte", "date-time"}


def _upstream() -> tuple[dict[str, Any], dict[str, Any]]:
    """The PodSpec schema and the definitions it refers to, from kubernetes-validate."""
    import kubernetes_validate  # a development dependency: only `make crds` and its check need it

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = base / f"v{KUBERNETES_VERSION}-local-strict"
    root = json.loads((folder / "podspec-v1.json").read_text())
    defs = json.loads((folder / "_definitions.json").read_text())["$defs"]
    return root, defs


def _single_type(value: Any) -> Any:
    if isinstance(value, list):
        types = [t for t in value if t != "null"]
        return types[0] if len(types) == 1 else value
    return value


def _convert(node: Any, defs: dict[str, Any], seen: tuple[str, ...] = ()) -> Any:
    if isinstance(node, list):
        return [_convert(v, defs, seen) for v in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is not None:
        name = ref.rsplit("/", 1)[-1]
        if name in seen:
            raise ValueError(f"recursive schema at {name}: cannot be structural")
        if name in _INT_OR_STRING:
            return {
                "x-kubernetes-int-or-string": True,
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                **({"description": node["description"]} if "description" in node else {}),
            }
        target = _convert(copy.deepcopy(defs[name]), defs, (*seen, name))
        # The field's own description is more specific than the type's.
        return {**target, **{k: v for k, v in node.items() if k == "description"}}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP_KEYS or (key == "additionalProperties" and value is False):
            continue
        if key == "format" and value not in _FORMATS:
            continue
        if key == "type":
            out[key] = _single_type(value)
        elif key == "properties":
            out[key] = {k: _convert(v, defs, seen) for k, v in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, defs, seen)
        else:
            out[key] = value
    # A list-map key must be required (or defaulted) in a CRD; where upstream's is not (container
    # ports: protocol), the list stays atomic.
    keys = out.get("x-kubernetes-list-map-keys")
    if keys is not None:
        required = set(dig(out, "items", "required") or [])
        if not set(keys) <= required:
            out.pop("x-kubernetes-list-map-keys")
            out.pop("x-kubernetes-list-type", None)
    return out


def build_schema() -> dict[str, Any]:
    """The structural PodSpec schema, built from kubernetes-validate's copy of upstream's."""
    root, defs = _upstream()
    schema = _convert(root, defs)
    for name in DROPPED_FIELDS:
        schema["properties"].pop(name, None)
    schema.pop("required", None)
    schema["type"] = "object"
    return dict(schema)


def render_schema() -> str:
    """:func:`build_schema` as the committed file's text."""
    return json.dumps(build_schema(), indent=1, sort_keys=True) + "\n"


def write_schema(path: Path = SCHEMA_FILE) -> Path:
    """Write the schema file (``make crds``)."""
    path.write_text(render_schema())
    return path


def schema_stale(path: Path = SCHEMA_FILE) -> bool:
    """Whether the schema file differs from what upstream's schema gives (False without
    kubernetes-validate installed: then there is nothing to compare with)."""
    try:
        text = render_schema()
    except ImportError:
        return False
    return not path.exists() or path.read_text() != text


@cache
def pod_spec_schema() -> dict[str, Any]:
    """The structural PodSpec schema (from the package's schema file)."""
    data: dict[str, Any] = json.loads(SCHEMA_FILE.read_text())
    return data


if __name__ == "__main__":
    print(write_schema())
