"""Types shared by both kinds: base model config, quantities, conditions, metadata."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue

from capstan.api.k8s_names import EnvVarName, LabelValue, TaintKey

# Kubernetes resource.Quantity: an integer or a string such as "500m", "256Gi", "1e3".
QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, bool):
        raise ValueError("must be a quantity such as 4, '500m' or '256Gi'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 4, '500m', '256Gi')")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "anyOf": [{"type": "integer"}, {"type": "string"}],
        }
    ),
]

#: The longest duration any spec field may ask for: one year, in seconds. Bigger values overflow
#: datetime arithmetic (the year 9999) and would make a reconcile fail for ever.
MAX_DURATION_S = 365 * 24 * 3600

# Go-style duration as accepted in rollout pauses: "30s", "2m", "1h30m".
DURATION_PATTERN = r"^([0-9]+(s|m|h))+$"
_DURATION_PART = re.compile(r"([0-9]+)(s|m|h)")
_DURATION_UNIT = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration such as ``30s``, ``2m``, ``1h30m``."""
    return float(sum(int(n) * _DURATION_UNIT[u] for n, u in _DURATION_PART.findall(text)))


def _check_duration(value: str) -> str:
    if parse_duration(value) > MAX_DURATION_S:
        raise ValueError(f"{value!r} is longer than the maximum of 8760h (one year)")
    return value


Duration = Annotated[
    str,
    Field(
        pattern=DURATION_PATTERN,
        max_length=32,
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": "duration(self) <= duration('8760h')", "message": "must be at most 8760h (one year)"}
            ]
        },
    ),
    AfterValidator(_check_duration),
]

ConditionStatus = Literal["True", "False", "Unknown"]


@dataclass(frozen=True)
class Rule:
    """A cross-field rule written once: CEL for the CRD, a Python check for everything else.

    ``field`` is the CEL fieldPath relative to the model the rule sits on (``""`` for itself).
    """

    field: str
    cel: str
    message: str
    check: Callable[[Any], bool]


@dataclass(frozen=True)
class Immutable:
    """A field that may not change once set (a CEL transition rule; the API server checks it on
    every update). ``field`` is the path below the model (``.checkpoint.volume``); ``why`` says why
    and what to do instead."""

    field: str
    why: str

    def _present(self, var: str) -> str:
        parts = self.field.strip(".").split(".")
        return " && ".join(f"has({var}.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))

    @property
    def cel(self) -> str:
        """``self`` equals ``oldSelf`` at the field, set or unset alike."""
        new, old = self._present("self"), self._present("oldSelf")
        path = self.field.strip(".")
        return f"(({new}) == ({old})) && (!({new}) || self.{path} == oldSelf.{path})"

    @property
    def message(self) -> str:
        """The API server's and the webhook's message."""
        return f"is immutable: {self.why}"

    def changed(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
        """Whether the field differs between two wire dicts of the model."""
        def at(obj: Any) -> Any:
            for part in self.field.strip(".").split("."):
                obj = obj.get(part) if isinstance(obj, Mapping) else None
            return obj

        return bool(at(old) != at(new))


class ApiModel(BaseModel):
    """Base for every API model: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True
    )
    rules: ClassVar[tuple[Rule, ...]] = ()
    immutable: ClassVar[tuple[Immutable, ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        rules = [
            {"rule": r.cel, "message": r.message, **({"fieldPath": r.field} if r.field else {})}
            for r in cls.rules
        ] + [{"rule": i.cel, "message": i.message, "fieldPath": i.field} for i in cls.immutable]
        if rules:
            schema["x-kubernetes-validations"] = rules
        return schema

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in self.rules:
            if not rule.check(self):
                where = f"{rule.field.lstrip('.')}: " if rule.field else ""
                raise ValueError(f"{where}{rule.message}")
        return self

    def wire(self) -> dict[str, Any]:
        """The object as Kubernetes JSON: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Condition(ApiModel):
    """A Kubernetes-style status condition."""

    type: str = Field(description="Condition type, e.g. Running, Succeeded, Placed.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="One-word CamelCase reason for the last transition.")
    message: str = Field(default="", description="Human-readable detail of the last transition.")
    last_transition_time: str | None = Field(
        default=None, description="When the status last changed (RFC 3339)."
    )
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was set for."
    )


class ObjectMeta(BaseModel):
    """The slice of metadata Capstan reads; everything else passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str = "default"
    uid: str = ""
    generation: int = 1
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class EnvVar(ApiModel):
    """A plain environment variable for the workload container."""

    name: EnvVarName = Field(min_length=1, description="Variable name.")
    value: str = Field(default="", description="Variable value.")


class Toleration(ApiModel):
    """A pod toleration (same fields and rules as core/v1 Toleration)."""

    key: TaintKey | None = Field(
        default=None, description="Taint key the toleration applies to; empty with operator Exists: all."
    )
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (the default)."
    )
    value: LabelValue | None = Field(default=None, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, le=MAX_DURATION_S, description="How long a NoExecute taint is tolerated."
    )

    # The rules of core/v1 ValidateTolerations.
    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            ".operator",
            "(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            "must be Exists when key is empty (which means: tolerate every taint)",
            lambda t: bool(t.key) or t.operator == "Exists",
        ),
        Rule(
            ".value",
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "must be empty when operator is Exists",
            lambda t: t.operator != "Exists" or not t.value,
        ),
        Rule(
            ".effect",
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "must be NoExecute when tolerationSeconds is set",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )


class Resources(ApiModel):
    """CPU and memory for each container; GPUs are set by the dedicated fields."""

    cpu: Quantity | None = Field(default=None, description="CPU request and limit, e.g. '32' or '500m'.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit, e.g. '256Gi'.")
    shared_memory: Quantity = Field(
        default="1Gi", description="Size of the in-memory /dev/shm volume (NCCL and data loaders need it)."
    )
