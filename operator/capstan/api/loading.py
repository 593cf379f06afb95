"""Parse Capstan resources from dicts and YAML files, with errors that name the field.

Input here is untrusted (a file given to ``capstan render``, an object in an AdmissionReview), so
every step is bounded: files by size, YAML by expanded node count (aliases count at their full
size, which defeats "billion laughs" documents) and nesting depth, and every error message by
length, whatever the input echoes. Any malformed shape becomes :class:`InvalidObject` whose lines
each start with where the problem is: a field path (``spec.workers``), ``(root)`` for the document
itself, ``line N, column M`` for YAML syntax, or ``(file)``.
"""

from __future__ import annotations

import reprlib
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError

from capstan import API_VERSION
from capstan.api.modelserving import ModelServing
from capstan.api.trainingjob import TrainingJob

#: One of Capstan's own objects, parsed (what a manifest or an admission request holds). Not to be
#: confused with :class:`capstan.kube.resources.ApiResource`, the REST endpoint of a kind.
CapstanObject = TrainingJob | ModelServing
KINDS: dict[str, type[TrainingJob] | type[ModelServing]] = {
    "TrainingJob": TrainingJob,
    "ModelServing": ModelServing,
}

#: Larger files are refused unread (the API server stores objects of at most ~1.5 MiB).
MAX_FILE_BYTES = 8 * 1024 * 1024
#: Nodes one file may expand to, aliases counted at their full size.
MAX_YAML_NODES = 200_000
MAX_YAML_DEPTH = 64
MAX_ERROR_LINES = 40
MAX_LINE_CHARS = 300
ROOT = "(root)"
FILE = "(file)"

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 2, 60, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short_repr(value: Any) -> str:
    """``repr`` bounded in size and work, for echoing user input in messages."""
    return _SHORT.repr(value)


def clip(text: str, limit: int = MAX_LINE_CHARS) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text[: limit * 4].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class InvalidObject(ValueError):
    """A Capstan object failed validation; ``errors`` holds one ``path: reason`` line per problem.

    Lines are clipped to :data:`MAX_LINE_CHARS` and at most :data:`MAX_ERROR_LINES` are kept, so a
    message never echoes a huge input.
    """

    def __init__(self, what: str, errors: list[str]) -> None:
        what = clip(what, 200)
        lines = [clip(e) for e in errors[:MAX_ERROR_LINES]]
        if len(errors) > MAX_ERROR_LINES:
            lines.append(f"{ROOT}: ... and {len(errors) - MAX_ERROR_LINES} more problems")
        super().__init__(f"{what} is invalid:\n" + "\n".join(f"  {e}" for e in lines))
        self.what = what
        self.errors = lines


class InvalidDocuments(InvalidObject):
    """Several documents of one file are invalid; ``problems`` holds each one's error."""

    def __init__(self, problems: Sequence[InvalidObject]) -> None:
        super().__init__(problems[0].what, [e for p in problems for e in p.errors])
        self.problems = list(problems)
        self.args = ("\n".join(str(p) for p in self.problems),)

    def __str__(self) -> str:
        return str(self.args[0])


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        else:
            name = part if isinstance(part, str) else short_repr(part)
            name = clip(name, 60)
            out += f".{name}" if out else name
    return out


def describe_errors(exc: ValidationError, prefix: str = "") -> list[str]:
    """Turn a pydantic error into ``field.path: reason`` lines a user can act on."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        path = _path(err["loc"])
        if prefix:
            path = f"{prefix}.{path}" if path else prefix
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check spelling and indentation)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "value_error" and msg.startswith((".", "[")):
            # A check deep inside a free-form value (a pod template) reports one problem per line,
            # each starting with its path below the field that holds the value.
            lines += [_joined(path, line) for line in msg.splitlines()]
            continue
        lines.append(f"{path or ROOT}: {msg}")
    return lines


def _joined(path: str, line: str) -> str:
    rel, sep, msg = line.partition(": ")
    return f"{path}{rel}: {msg}" if sep else f"{path or ROOT}: {line}"


def _kind_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def parse_object(obj: Any, where: str = "") -> CapstanObject:
    """Validate one Capstan resource (any value); raise :class:`InvalidObject` naming each bad field.

    ``where`` (e.g. ``"jobs.yaml document 2"``) prefixes the resource's description in the message.
    Nothing else is ever raised, whatever ``obj`` is.
    """
    if not isinstance(obj, Mapping):
        expected = "expected a mapping with apiVersion, kind, metadata and spec"
        raise InvalidObject(where or "resource", [f"{ROOT}: {expected}, got {_kind_of(obj)}"])
    kind = obj.get("kind")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    shown = clip(name, 80) if isinstance(name, str) else "<unnamed>"
    desc = f"{kind if isinstance(kind, str) and kind in KINDS else 'resource'} {shown!r}"
    what = f"{where} ({desc})" if where else desc
    if not isinstance(kind, str) or kind not in KINDS:
        raise InvalidObject(what, [f"kind: expected one of {', '.join(KINDS)}, got {short_repr(kind)}"])
    api_version = obj.get("apiVersion", API_VERSION)
    if api_version != API_VERSION:
        raise InvalidObject(what, [f"apiVersion: expected {API_VERSION}, got {short_repr(api_version)}"])
    body = {k: v for k, v in obj.items() if k in ("apiVersion", "kind", "metadata", "spec", "status")}
    try:
        return KINDS[kind].model_validate(body)
    except ValidationError as exc:
        raise InvalidObject(what, describe_errors(exc)) from None
    except RecursionError:
        raise InvalidObject(what, [f"{ROOT}: nested too deeply"]) from None


# --- YAML ------------------------------------------------------------------------------------------


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents nesting deeper than :data:`MAX_YAML_DEPTH` or expanding
    (aliases at their full size) to more than :data:`MAX_YAML_NODES` nodes, before constructing."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError, TypeError) as exc:
            # e.g. a 5000-digit integer or a 13th month: say where, as for a syntax error.
            reason = str(exc).split("; use sys.", 1)[0]  # Python's hint is for programmers
            raise ConstructorError(None, None, f"cannot read this value: {reason}", node.start_mark) from None

    def compose_document(self) -> yaml.Node | None:
        node: yaml.Node | None = super().compose_document()
        if node is None:
            return None
        self._nodes += _expanded_size(node, {}, MAX_YAML_NODES - self._nodes)
        return node


def _expanded_size(node: yaml.Node, memo: dict[int, int], budget: int, level: int = 1) -> int:
    """Nodes ``node`` stands for once every alias is expanded.

    Raises past ``budget`` nodes, past :data:`MAX_YAML_DEPTH` levels (a chain of aliases nests
    deeper than the text shows) or on an alias that contains itself.
    """
    if level > MAX_YAML_DEPTH:
        problem = f"nested deeper than {MAX_YAML_DEPTH} levels (through aliases)"
        raise ComposerError(None, None, problem, node.start_mark)
    key = id(node)
    if key in memo:
        if memo[key] < 0:
            raise ComposerError(None, None, "an alias refers to itself", node.start_mark)
        return memo[key]
    memo[key] = -1
    size = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        size += _expanded_size(child, memo, budget - size, level + 1)
        if size > budget:
            raise ComposerError(
                None, None, f"expands to more than {MAX_YAML_NODES} nodes (aliases counted in full)",
                node.start_mark,
            )
    memo[key] = size
    return size


def _yaml_problem(exc: Exception) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else FILE
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = f"{context}, {problem}" if context else problem
    kind = "not valid YAML" if isinstance(exc, yaml.YAMLError) else f"cannot load ({type(exc).__name__})"
    return f"{where}: {kind}: {text}"


def _read(path: str | Path) -> bytes:
    label = str(path)
    try:
        if label == "-":
            data: bytes = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidObject(label, [f"{FILE}: cannot read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise InvalidObject(label, [f"{FILE}: larger than {MAX_FILE_BYTES} bytes"])
    return data


def parse_documents(data: bytes | str, label: str = "<input>") -> list[Any]:
    """Every non-empty YAML document of ``data``, any shape, within the size limits.

    Raises :class:`InvalidObject` naming the line for syntax errors, the byte for non-UTF-8
    input, and the limit for alias bombs and deep nesting.
    """
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise InvalidObject(label, [f"{FILE}: larger than {MAX_FILE_BYTES} bytes"])
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise InvalidObject(
                label, [f"{FILE}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"]
            ) from None
    else:
        text = data
    try:
        loader = _BoundedLoader(text)
        try:
            docs = []
            while loader.check_data():
                doc = loader.get_data()
                if doc is not None:
                    docs.append(doc)
            return docs
        finally:
            loader.dispose()
    except RecursionError:
        raise InvalidObject(label, [f"{FILE}: not valid YAML: nested too deeply"]) from None
    except Exception as exc:  # YAMLError, and e.g. ValueError for a 5000-digit integer
        raise InvalidObject(label, [_yaml_problem(exc)]) from None


def load_documents(path: str | Path) -> list[dict[str, Any]]:
    """Read every YAML document of a file ('-' for stdin), skipping empty ones.

    Raises :class:`InvalidObject` for an unreadable, oversized or malformed file, and for a
    document that is not a mapping (naming its index).
    """
    label = str(path)
    docs = parse_documents(_read(path), label)
    expected = "expected a mapping (a Kubernetes object)"
    problems = [
        InvalidObject(f"{label} document {i}", [f"{ROOT}: {expected}, got {_kind_of(d)}"])
        for i, d in enumerate(docs, 1)
        if not isinstance(d, dict)
    ]
    if problems:
        raise problems[0] if len(problems) == 1 else InvalidDocuments(problems)
    return docs


def load_objects(path: str | Path) -> list[CapstanObject]:
    """Parse all Capstan resources in a YAML file; other kinds are an error.

    Every invalid document is reported (:class:`InvalidDocuments` when more than one), each named
    by its index in the file.
    """
    label = str(path)
    resources: list[CapstanObject] = []
    problems: list[InvalidObject] = []
    for i, doc in enumerate(parse_documents(_read(path), label), 1):
        try:
            resources.append(parse_object(doc, where=f"{label} document {i}"))
        except InvalidObject as exc:
            problems.append(exc)
    if problems:
        raise problems[0] if len(problems) == 1 else InvalidDocuments(problems)
    return resources
