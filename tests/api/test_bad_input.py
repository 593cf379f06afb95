"""Bad input is rejected with a message that names the field, on the CLI and in the models."""

from __future__ import annotations

import contextlib
import copy
import io
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.api.bodies import tj

from capstan.api import loading
from capstan.api.loading import (
    MAX_ERROR_LINES,
    MAX_LINE_CHARS,
    InvalidObject,
    parse_documents,
    parse_object,
)
from capstan.cli import main
from capstan.render import render_trainingjob

BAD = [
    (tj(workers=0), "spec.workers", "greater than or equal to 1"),
    (tj(gpusPerWorker=-1), "spec.gpusPerWorker", "greater than or equal to 0"),
    (tj(topology={"policy": "Sometimes"}), "spec.topology.policy", "'Required', 'Preferred' or 'None'"),
    (tj(resources={"memory": "lots"}), "spec.resources.memory", "not a Kubernetes quantity"),
    (tj(checkpoint={"snapshots": {}}), "spec", "snapshots need checkpoint.volume"),
    (
        tj(checkpoint={"volume": {"size": "1Gi", "claimName": "x"}}),
        "spec.checkpoint.volume",
        "exactly one of size",
    ),
    (tj(workerz=3), "spec.workerz", "unknown field"),
    (tj(launcher="mpirun"), "spec.launcher", "'torchrun' or 'deepspeed'"),
    (tj(launcher="deepspeed"), "spec", "launcher deepspeed needs args"),
    (tj(launcher="deepspeed", command=["torchrun"], args=["train.py"]), "spec",
     "spec.command[0]: torchrun cannot run under launcher deepspeed"),
    (tj(launcher="deepspeed", args=["--num_gpus=2", "--node_rank", "1", "train.py"]), "spec",
     "spec.args[1]: --node_rank is set by Capstan"),
    (tj(template={"spec": {"volumes": [{"name": "hostfile", "emptyDir": {}}]}}),
     "spec.template.spec.volumes[0].name", "'hostfile' is Capstan's own volume"),
    (tj(image=""), "spec.image", "at least 1 character"),
    ({**tj(), "metadata": {"name": "GPT_Small"}}, "metadata.name", "should match pattern"),
    ({**tj(), "metadata": {"name": "a" * 254}}, "metadata.name", "at most 253 characters"),
    ({**tj(), "kind": "TrainJob"}, "kind", "expected one of TrainingJob, ModelServing"),
    ({**tj(), "apiVersion": "capstan.dev/v2"}, "apiVersion", "expected capstan.dev/v1alpha1"),
    (
        {
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": "m"},
            "spec": {"model": {}},
        },
        "spec.model",
        "exactly one of fromTrainingJob, uri or pvc",
    ),
    (
        {
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": "m"},
            "spec": {"model": {"uri": "s3://b/m"}, "rollout": {"steps": [{"weight": 150}]}},
        },
        "spec.rollout.steps[0].weight",
        "less than or equal to 100",
    ),
    (
        {
            "apiVersion": "capstan.dev/v1alpha1",
            "kind": "ModelServing",
            "metadata": {"name": "m"},
            "spec": {
                "model": {"uri": "s3://b/m"},
                "rollout": {"steps": [{"weight": 10, "pause": "2 minutes"}]},
            },
        },
        "spec.rollout.steps[0].pause",
        "should match pattern",
    ),
]


@pytest.mark.parametrize(("body", "field", "reason"), BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_rejected_with_field_path(body: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(InvalidObject) as err:
        parse_object(body)
    assert any(line.startswith(f"{field}:") and reason in line for line in err.value.errors), err.value.errors


def test_cli_render_exits_nonzero_with_field_path(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tj(workers=0, gpusPerWorker=-2)))
    assert main(["render", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.workers" in err and "spec.gpusPerWorker" in err


@pytest.mark.parametrize("name", ["a" * 63, "a" * 253, "9lives", "gpt.v2.small", "x"])
def test_any_legal_name_gives_valid_children(name: str, k8s_valid: Any) -> None:
    job = parse_object({**tj(workers=3), "metadata": {"name": name, "uid": "u-1"}})
    for obj in render_trainingjob(job):  # type: ignore[arg-type]
        k8s_valid(obj)
        meta = obj["metadata"]
        assert len(meta["name"]) <= 63
        for value in meta["labels"].values():
            assert len(value) <= 63
        if obj["kind"] == "Pod":
            assert len(obj["spec"]["hostname"]) <= 63 and obj["spec"]["hostname"][0].isalpha()


# --- malformed documents: clean, located, bounded errors -------------------------------------------

#: Where an error line may say the problem is: the document, the file, a YAML position, or a field.
LOCATION = re.compile(
    r"^(\(root\)|\(file\)|line \d+, column \d+|(apiVersion|kind|metadata|spec|status)\b[^\n]*?): \S"
)
SAMPLES = sorted((Path(__file__).resolve().parents[2] / "manifests" / "samples").glob("*.yaml"))


def alias_bomb(levels: int = 9) -> str:
    """The "billion laughs" document: 9 levels of 9 aliases expand to 9**9 strings."""
    lines = ["apiVersion: capstan.dev/v1alpha1", "kind: TrainingJob"]
    lines.append('a0: &a0 ["lol","lol","lol","lol","lol"]')
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    lines.append(f"metadata: {{name: *a{levels - 1}}}")
    return "\n".join(lines) + "\n"


def check_cli_output(rc: int, out: str, err: str, docs: int = 1) -> None:
    """Exit 0 or 2, no traceback, every rejection line located, output bounded."""
    assert rc in (0, 2), (rc, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in out
    if rc == 2:
        assert out == ""
        assert err.startswith("error: ")
        for line in err.splitlines():
            if line.startswith("error: "):
                assert line.endswith(" is invalid:"), line
            else:
                assert line.startswith("  ") and LOCATION.match(line[2:]), line
                assert len(line) <= MAX_LINE_CHARS + 2
        assert len(err) <= docs * (MAX_ERROR_LINES + 2) * (MAX_LINE_CHARS + 10) + 1000
    assert len(out) < 4 * 2**20


MALFORMED: list[tuple[str, bytes, str]] = [
    ("list document", b"- a\n- b\n", "(root): expected a mapping"),
    ("scalar document", b"just a string\n", "(root): expected a mapping"),
    ("number document", b"42\n", "got a number"),
    ("kind is a list", b"kind: [TrainingJob]\nmetadata: {name: a}\n", "kind: expected"),
    ("kind is a mapping", b"kind: {a: 1}\nmetadata: {name: a}\n", "kind: expected one of"),
    ("metadata is a list", b"kind: TrainingJob\nmetadata: [a]\nspec: {image: i, workers: 1}\n", "metadata: "),
    ("metadata is a string", b"kind: TrainingJob\nmetadata: a\nspec: {image: i, workers: 1}\n", "metadata: "),
    ("spec is a list", b"kind: TrainingJob\nmetadata: {name: a}\nspec: [1]\n", "spec: "),
    ("spec is a number", b"kind: ModelServing\nmetadata: {name: a}\nspec: 3\n", "spec: "),
    ("name is a mapping", b"kind: TrainingJob\nmetadata: {name: {a: 1}}\n", "metadata.name"),
    ("not UTF-8", b"kind: TrainingJob\nmetadata: {name: \xff\xfe}\n", "(file): not UTF-8"),
    ("alias bomb", alias_bomb().encode(), "expands to more than"),
    ("self alias", b"kind: TrainingJob\nmetadata: &m {name: *m}\n", "refers to itself"),
    ("deep nesting", b"kind: TrainingJob\nspec: " + b"[" * 200 + b"]" * 200 + b"\n", "nested deeper"),
    ("5000-digit integer", b"kind: TrainingJob\nspec: {workers: " + b"9" * 5000 + b"}\n", "cannot read"),
    ("syntax error", b"kind: TrainingJob\nmetadata: {name: a\n", "not valid YAML"),
    ("tab indentation", b"kind: TrainingJob\nspec:\n\tworkers: 1\n", "not valid YAML"),
    ("huge key", b"kind: TrainingJob\nspec:\n  ? " + b"k" * 10**5 + b"\n  : 1\n", "spec.kkk"),
]


@pytest.mark.parametrize("command", [["render"], ["run", "--local"]], ids=["render", "run-local"])
@pytest.mark.parametrize(("case", "data", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_cli_rejects_malformed_file_cleanly(
    tmp_path: Path, capsys: Any, command: list[str], case: str, data: bytes, needle: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(data)
    rc = main([*command, "-f", str(path), *(["--workdir", str(tmp_path)] if "run" in command else [])])
    out, err = capsys.readouterr()
    assert rc == 2, (case, out, err)
    check_cli_output(rc, out, err)
    assert needle in err, err
    assert len(err) < 2000  # the alias bomb once printed 312 MB


def test_every_bad_document_is_reported_by_index(tmp_path: Path, capsys: Any) -> None:
    path = tmp_path / "mixed.yaml"
    path.write_text(yaml.safe_dump_all([tj(), [1, 2], tj(workers=0), "x", tj()]))
    assert main(["render", "-f", str(path)]) == 2
    out, err = capsys.readouterr()
    check_cli_output(2, out, err, docs=3)
    headers = [line for line in err.splitlines() if line.startswith("error: ")]
    assert [h.split(" document ")[1].split()[0] for h in headers] == ["2", "3", "4"]
    assert "spec.workers" in err


def test_unreadable_and_oversized_files(tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    for target, needle in ((tmp_path / "missing.yaml", "cannot read"), (tmp_path, "cannot read")):
        assert main(["render", "-f", str(target)]) == 2
        out, err = capsys.readouterr()
        check_cli_output(2, out, err)
        assert f"(file): {needle}" in err
    monkeypatch.setattr(loading, "MAX_FILE_BYTES", 100)
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(tj(args=["x" * 200])))
    assert main(["render", "-f", str(path)]) == 2
    assert "(file): larger than 100 bytes" in capsys.readouterr().err


def test_error_lines_are_bounded() -> None:
    body = tj(**{f"unknown{i}": "v" * 10000 for i in range(500)})
    with pytest.raises(InvalidObject) as err:
        parse_object(body)
    assert len(err.value.errors) == MAX_ERROR_LINES + 1
    assert "more problems" in err.value.errors[-1]
    assert len(str(err.value)) < (MAX_ERROR_LINES + 2) * (MAX_LINE_CHARS + 4)


# --- properties ------------------------------------------------------------------------------------

_SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30),
    st.sampled_from([-1, 0, 10**18, 2**64, -(2**63), 1e308, "", "x" * 400]),
)
JSON = st.recursive(
    _SCALAR,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=12), c, max_size=4),
    max_leaves=25,
)
_BASES = [d for p in SAMPLES for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if len(prefix) > 8:  # not into the deep nesting a mutation made
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated_resource(draw: st.DrawFn) -> Any:
    """A sample resource with one to three values replaced by arbitrary JSON (or keys added)."""
    doc: Any = copy.deepcopy(draw(st.sampled_from(_BASES)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        value = draw(JSON)
        if not path:
            return value
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            parent[draw(st.text(min_size=1, max_size=10))] = value  # an unknown field
        else:
            parent[path[-1]] = value
    return doc


def _located(lines: list[str]) -> None:
    for line in lines:
        assert LOCATION.match(line), line
        assert len(line) <= MAX_LINE_CHARS
    assert len(lines) <= MAX_ERROR_LINES + 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(obj=mutated_resource() | JSON)
def test_parse_resource_raises_only_located_invalid_resource(obj: Any) -> None:
    try:
        parse_object(obj)
    except InvalidObject as exc:
        _located(exc.errors)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_load_or_fail_located(data: bytes) -> None:
    try:
        docs = parse_documents(data)
    except InvalidObject as exc:
        _located(exc.errors)
        return
    for doc in docs:
        try:
            parse_object(doc)
        except InvalidObject as exc:
            _located(exc.errors)


# --- a corpus of bad files through the CLI, in-process -----------------------------------------

_WRONG = [[], {}, "x", 3, -1, 0, True, None, 1.5, "x" * 3000, 10**30, -(10**30), 2**63, float("inf"), [[[]]]]


def _mutate(rng: random.Random, doc: Any) -> Any:
    doc = copy.deepcopy(doc)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(doc))
        if not path:
            return rng.choice(_WRONG)
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        op = rng.random()
        if op < 0.15 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.3 and isinstance(parent, dict):
            parent[f"bogus{rng.randint(0, 9)}"] = rng.choice(_WRONG)
        elif op < 0.4:
            nested: Any = "deep"
            for _ in range(rng.randint(10, 60)):
                nested = [nested] if rng.random() < 0.5 else {"k": nested}
            parent[path[-1]] = nested
        else:
            parent[path[-1]] = rng.choice(_WRONG)
    return doc


def _corrupt(rng: random.Random, text: bytes) -> bytes:
    op = rng.randrange(5)
    if op == 0:
        cut = rng.randrange(len(text))
        return text[:cut]
    if op == 1:
        at = rng.randrange(len(text))
        return text[:at] + bytes([rng.randrange(128, 256)]) + text[at:]
    if op == 2:
        return text + b"\n---\n" + alias_bomb(rng.randint(6, 10)).encode()
    if op == 3:
        return text.replace(b"  ", b"\t", 1)
    return text + b"\nspec: " + b"[" * rng.randint(60, 400) + b"\n"


@pytest.mark.timeout(120)
def test_corpus_of_bad_documents_through_the_cli(tmp_path: Path) -> None:
    rng = random.Random(20240611)
    files: list[tuple[bytes, int]] = []
    for _ in range(250):  # 2500 structurally mutated documents, ten to a file
        docs = [_mutate(rng, rng.choice(_BASES)) for _ in range(10)]
        files.append((yaml.safe_dump_all(docs, sort_keys=False).encode(), 10))
    for _ in range(500):  # 500 textually corrupted single documents
        text = yaml.safe_dump(rng.choice(_BASES), sort_keys=False).encode()
        files.append((_corrupt(rng, text), 1))
    path = tmp_path / "corpus.yaml"
    rejected = 0
    for data, docs in files:
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(["render", "-f", str(path)])
        check_cli_output(rc, out.getvalue(), err.getvalue(), docs)
        rejected += rc == 2
    assert rejected > len(files) * 0.9
