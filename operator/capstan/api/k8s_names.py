"""Kubernetes' own rules for names and values the specs pass on to Pods, PVCs and snapshots.

The rules and their wording follow k8s.io/apimachinery/pkg/util/validation (IsDNS1123Subdomain,
IsQualifiedName, IsValidLabelValue, IsEnvVarName) and the core/v1 Pod validation (tolerations,
image): a value the API server would refuse with 422 is refused here first, naming the field,
instead of passing every check and failing only when the operator creates the children.

Each rule is an ``Annotated`` string type: a check with Kubernetes' message for the models, and
``pattern`` / ``maxLength`` for the CRD schema, so the API server applies the same rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema

DNS1123_LABEL_MAX = 63
DNS1123_SUBDOMAIN_MAX = 253
QUALIFIED_NAME_MAX = 63
LABEL_VALUE_MAX = 63

_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN_PATTERN = rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
QUALIFIED_NAME_PATTERN = rf"^({_DNS1123_LABEL}(\.{_DNS1123_LABEL})*/)?{_QUALIFIED_NAME}$"
LABEL_VALUE_PATTERN = rf"^({_QUALIFIED_NAME})?$"
ENV_VAR_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
IMAGE_PATTERN = r"^\S+$"

_SUBDOMAIN_RE = re.compile(DNS1123_SUBDOMAIN_PATTERN)
_NAME_RE = re.compile(rf"^{_QUALIFIED_NAME}$")
_LABEL_VALUE_RE = re.compile(LABEL_VALUE_PATTERN)
_ENV_RE = re.compile(ENV_VAR_NAME_PATTERN)

_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
    "and must start and end with an alphanumeric character (e.g. 'example.com')"
)
_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
    "with an alphanumeric character (e.g. 'MyName', 'my.name' or '123-abc')"
)


def dns1123_subdomain_errors(value: str, max_length: int = DNS1123_SUBDOMAIN_MAX) -> list[str]:
    """Why ``value`` is not a DNS-1123 subdomain of at most ``max_length`` characters ([]: it is)."""
    errors = []
    if len(value) > max_length:
        errors.append(f"must be no more than {max_length} characters")
    if not _SUBDOMAIN_RE.match(value):
        errors.append(_SUBDOMAIN_MSG)
    return errors


def qualified_name_errors(value: str) -> list[str]:
    """Why ``value`` is not a qualified name (``[prefix/]name``: label, annotation and
    nodeSelector keys, taint keys) — [] when it is."""
    prefix, slash, name = value.rpartition("/")
    if slash and not prefix:
        return ["prefix part must be non-empty"]
    if value.count("/") > 1:
        return [f"a qualified name is an optional DNS subdomain prefix and '/', then a {_NAME_MSG}"]
    errors = []
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > QUALIFIED_NAME_MAX:
        errors.append(f"name part must be no more than {QUALIFIED_NAME_MAX} characters")
    if name and not _NAME_RE.match(name):
        errors.append(_NAME_MSG)
    if prefix:
        errors += [f"prefix part {e}" for e in dns1123_subdomain_errors(prefix)]
    return errors


def label_value_errors(value: str) -> list[str]:
    """Why ``value`` is not a valid label (or nodeSelector) value ([]: it is; empty is valid)."""
    errors = []
    if len(value) > LABEL_VALUE_MAX:
        errors.append(f"must be no more than {LABEL_VALUE_MAX} characters")
    if not _LABEL_VALUE_RE.match(value):
        errors.append(
            "a valid label value must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character"
        )
    return errors


def env_var_name_errors(value: str) -> list[str]:
    """Why ``value`` is not a valid environment variable name ([]: it is)."""
    if _ENV_RE.match(value):
        return []
    return [
        "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', "
        "or '.', and must not start with a digit (e.g. 'NCCL_DEBUG' or 'my.env-name')"
    ]


def image_errors(value: str) -> list[str]:
    """Why ``value`` is not a usable container image reference ([]: it is)."""
    if not value.strip():
        return ["must not be empty"]
    if value != value.strip():
        return ["must not have leading or trailing whitespace"]
    if any(c.isspace() for c in value):
        return ["must not contain whitespace"]
    return []


def _checked(what: str, errors: Callable[[str], list[str]]) -> AfterValidator:
    def check(value: str) -> str:
        found = errors(value)
        if found:
            raise ValueError(f"{value!r} is not a valid {what}: {'; '.join(found)}")
        return value

    return AfterValidator(check)


def _schema(pattern: str, max_length: int | None = None) -> WithJsonSchema:
    schema: dict[str, Any] = {"type": "string", "pattern": pattern}
    if max_length is not None:
        schema["maxLength"] = max_length
    return WithJsonSchema(schema)


def _subdomain(what: str, max_length: int = DNS1123_SUBDOMAIN_MAX) -> Any:
    return Annotated[
        str,
        _checked(what, lambda v: dns1123_subdomain_errors(v, max_length)),
        _schema(DNS1123_SUBDOMAIN_PATTERN, max_length),
    ]


# Object names (DNS-1123 subdomains), one type per kind so each message says what it names.
ServiceAccountName = _subdomain("ServiceAccount name")
StorageClassName = _subdomain("StorageClass name")
ClaimName = _subdomain("PersistentVolumeClaim name")
VolumeSnapshotName = _subdomain("VolumeSnapshot name")
VolumeSnapshotClassName = _subdomain("VolumeSnapshotClass name")
TrainingJobName = _subdomain("TrainingJob name")
GatewayName = _subdomain("Gateway name")
# Kueue puts it in the kueue.x-k8s.io/queue-name label: a LocalQueue name that is also a label value.
QueueName = _subdomain("Kueue LocalQueue name", LABEL_VALUE_MAX)

def _taint_key_errors(value: str) -> list[str]:
    return [] if value == "" else qualified_name_errors(value)


QualifiedName = Annotated[
    str,
    _checked("label key (qualified name)", qualified_name_errors),
    _schema(QUALIFIED_NAME_PATTERN, DNS1123_SUBDOMAIN_MAX + 1 + QUALIFIED_NAME_MAX),
]
# A toleration's key: a qualified name, or empty (with operator Exists: every taint).
TaintKey = Annotated[
    str,
    _checked("taint key (qualified name)", _taint_key_errors),
    _schema(f"^({QUALIFIED_NAME_PATTERN[1:-1]})?$", DNS1123_SUBDOMAIN_MAX + 1 + QUALIFIED_NAME_MAX),
]
LabelValue = Annotated[str, _checked("label value", label_value_errors), _schema(LABEL_VALUE_PATTERN, 63)]
EnvVarName = Annotated[
    str, _checked("environment variable name", env_var_name_errors), _schema(ENV_VAR_NAME_PATTERN)
]
Image = Annotated[str, _checked("image", image_errors), _schema(IMAGE_PATTERN, 4096)]
