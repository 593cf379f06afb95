"""Parse Capstan resources from dicts and YAML files, with errors that name the field."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from capstan import API_VERSION
from capstan.api.modelserving import ModelServing
from capstan.api.trainingjob import TrainingJob

Resource = TrainingJob | ModelServing
KINDS: dict[str, type[TrainingJob] | type[ModelServing]] = {
    "TrainingJob": TrainingJob,
    "ModelServing": ModelServing,
}


class InvalidResource(ValueError):
    """A resource failed validation; ``errors`` holds one ``path: reason`` line per problem."""

    def __init__(self, what: str, errors: list[str]) -> None:
        super().__init__(f"{what} is invalid:\n" + "\n".join(f"  {e}" for e in errors))
        self.what = what
        self.errors = errors


def _path(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """Turn a pydantic error into ``field.path: reason`` lines a user can act on."""
    lines = []
    for err in exc.errors():
        path = _path(err["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check spelling and indentation)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{path}: {msg}" if path else msg)
    return lines


def parse_resource(obj: dict[str, Any]) -> Resource:
    """Validate one Capstan resource dict; raise :class:`InvalidResource` naming each bad field."""
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "<unnamed>")
    what = f"{kind or 'resource'} {name!r}"
    if kind not in KINDS:
        raise InvalidResource(what, [f"kind: expected one of {', '.join(KINDS)}, got {kind!r}"])
    if obj.get("apiVersion", API_VERSION) != API_VERSION:
        raise InvalidResource(what, [f"apiVersion: expected {API_VERSION}, got {obj.get('apiVersion')!r}"])
    body = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec", "status")}
    try:
        return KINDS[kind].model_validate(body)
    except ValidationError as exc:
        raise InvalidResource(what, describe_errors(exc)) from None


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Read every YAML document of a file ('-' for stdin), skipping empty ones."""
    import sys

    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    try:
        return [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise InvalidResource(str(path), [f"not valid YAML: {exc}"]) from None


def load_resources(path: str | Path) -> list[Resource]:
    """Parse all Capstan resources in a YAML file; other kinds are an error."""
    return [parse_resource(doc) for doc in load_documents(path)]
