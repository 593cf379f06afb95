"""The webhook server over HTTP: malformed AdmissionReviews get a 400 or a clear denial, never a 500.

The server is Capstan's :class:`ReviewServer` (plain HTTP on loopback), serving kopf's own
admission entry point with Capstan's validating handlers registered, as in the operator.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kopf._cogs.structs import references
from kopf._core.engines import admission as kopf_admission
from kopf._core.engines import indexing
from kopf._core.reactor import inventory
from tests.api.bodies import make_trainingjob

from capstan.admission import WEBHOOK_IDS, handlers
from capstan.admission.server import ReviewServer, review_problem

pytestmark = pytest.mark.timeout(60)
PYTHON_NOISE = (
    "Traceback", "object has no attribute", "KeyError", "Expecting value", "NoneType", "unhashable"
)


class _NoNodes:
    async def nodes(self, api: Any = None) -> list[dict[str, Any]]:
        return []


@pytest.fixture
async def webhook(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[str]:
    """URL of the TrainingJob webhook served by ReviewServer with kopf's admission engine."""
    monkeypatch.setattr(handlers, "NODES", _NoNodes())
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    insights = references.Insights()
    for plural, kind in (("trainingjobs", "TrainingJob"), ("modelservings", "ModelServing")):
        insights.webhook_resources.add(
            references.Resource(
                group="capstan.dev", version="v1alpha1", plural=plural, kind=kind, namespaced=True
            )
        )
    fn = functools.partial(
        kopf_admission.serve_admission_request,
        settings=kopf.OperatorSettings(), registry=registry, insights=insights,
        memories=inventory.ResourceMemories(), memobase=kopf.Memo(),
        indices=indexing.OperatorIndexers().indices,
    )
    server = ReviewServer(addr="127.0.0.1", host="127.0.0.1", insecure=True)
    serving = server(fn)
    config = await serving.__anext__()
    try:
        yield f"{config['url'].rstrip('/')}/{WEBHOOK_IDS['TrainingJob']}"
    finally:
        await serving.aclose()


def review(obj: Any = None, **request: Any) -> dict[str, Any]:
    base = {
        "uid": "u-1",
        "kind": {"group": "capstan.dev", "version": "v1alpha1", "kind": "TrainingJob"},
        "resource": {"group": "capstan.dev", "version": "v1alpha1", "resource": "trainingjobs"},
        "operation": "CREATE",
        "userInfo": {"username": "alice"},
        "object": obj,
    }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {**base, **request}}


def job(**fields: Any) -> dict[str, Any]:
    """The body with top-level ``fields`` replaced (``spec=...`` replaces the whole spec)."""
    return {**make_trainingjob("gpt").namespace("a").uid("x").workers(1).obj(), **fields}


async def post(url: str, data: bytes) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.post(url, data=data) as resp:
        return resp.status, await resp.text()


async def test_good_and_bad_objects(webhook: str) -> None:
    status, text = await post(webhook, json.dumps(review(job())).encode())
    assert status == 200 and json.loads(text)["response"] == {"uid": "u-1", "allowed": True}
    status, text = await post(webhook, json.dumps(review(job(spec={"image": "i", "workers": 0}))).encode())
    answer = json.loads(text)["response"]
    assert status == 200 and answer["allowed"] is False and answer["status"]["code"] == 422
    assert "spec.workers" in answer["status"]["message"]


MALFORMED: list[tuple[str, bytes, str]] = [
    ("not JSON", b"{not json", "not a JSON document"),
    ("not UTF-8", b'{"a": "\xff"}', "not a JSON document"),
    ("deeply nested JSON", b"[" * 100000 + b"]" * 100000, "not a JSON document"),
    ("a list", b"[1, 2]", "expected a JSON object, got an array"),
    ("a string", b'"review"', "expected a JSON object"),
    ("no request", b"{}", "request: expected an object, got null"),
    ("request is a list", b'{"request": []}', "request: expected an object, got an array"),
    ("no uid", json.dumps({"request": {"object": {}}}).encode(), "request.uid"),
]


@pytest.mark.parametrize(("case", "body", "needle"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_unanswerable_review_gets_400(webhook: str, case: str, body: bytes, needle: str) -> None:
    status, text = await post(webhook, body)
    assert status == 400, (case, status, text)
    assert needle in text and "malformed AdmissionReview" in text
    assert not any(noise in text for noise in PYTHON_NOISE), text


DENIED: list[tuple[str, dict[str, Any], str]] = [
    ("object is a list", review([1]), "request.object: expected an object, got an array"),
    ("object is a string", review("x"), "request.object: expected an object"),
    ("no object at all", review(None), "request.object: missing"),
    ("metadata is a list", review(job(metadata=["a"])), "request.object.metadata: expected an object"),
    ("name is a number", review(job(metadata={"name": 5})), "request.object.metadata.name: expected a"),
    ("labels not strings", review(job(metadata={"name": "a", "labels": {"a": 1}})), "metadata.labels['a']"),
    ("kind is a list", review(job(kind=["TrainingJob"])), "request.object.kind: expected a string"),
    ("no userInfo", review(job(), userInfo=None), "request.userInfo"),
    ("resource is a string", review(job(), resource="trainingjobs"), "request.resource"),
    ("operation is a list", review(job(), operation=["CREATE"]), "request.operation"),
]


@pytest.mark.parametrize(("case", "body", "needle"), DENIED, ids=[d[0] for d in DENIED])
async def test_malformed_review_is_denied_by_name(
    webhook: str, case: str, body: dict[str, Any], needle: str
) -> None:
    status, text = await post(webhook, json.dumps(body).encode())
    assert status == 200, (case, status, text)
    answer = json.loads(text)
    assert answer["kind"] == "AdmissionReview" and answer["response"]["uid"] == "u-1"
    assert answer["response"]["allowed"] is False and answer["response"]["status"]["code"] == 400
    assert needle in answer["response"]["status"]["message"]


OBJECT_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("spec is a list", job(spec=[1]), "spec: "),
    ("spec is a string", job(spec="x"), "spec: "),
    ("apiVersion wrong", job(apiVersion="capstan.dev/v9"), "apiVersion: "),
    ("kind unknown", job(kind="Pod"), "kind: "),
    ("annotations a list", job(metadata={"name": "a", "annotations": ["x"]}), "metadata.annotations"),
    ("argsTemplate bomb", {
        **job(kind="ModelServing"),
        "spec": {"model": {"uri": "s3://b/m"}, "runtime": "custom", "image": "s:1",
                 "argsTemplate": "{{ name|indent(1500000000) }}"},
    }, "spec.argsTemplate: "),
]


@pytest.mark.parametrize(("case", "obj", "needle"), OBJECT_FIELDS, ids=[o[0] for o in OBJECT_FIELDS])
async def test_bad_object_fields_are_denied_cleanly(
    webhook: str, case: str, obj: dict[str, Any], needle: str
) -> None:
    status, text = await post(webhook, json.dumps(review(obj)).encode())
    assert status == 200, (case, status, text)
    answer = json.loads(text)["response"]
    assert answer["allowed"] is False and answer["status"]["code"] in (400, 422), answer
    assert needle in answer["status"]["message"], answer
    assert not any(noise in answer["status"]["message"] for noise in PYTHON_NOISE), answer


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=15,
)


@st.composite
def _mangled_review(draw: st.DrawFn) -> Any:
    body = review(job())
    target = draw(st.sampled_from([body, body["request"], body["request"]["object"],
                                   body["request"]["object"]["metadata"]]))
    target[draw(st.sampled_from(sorted(target)) | st.text(max_size=5))] = draw(_JSON)
    return body


@settings(max_examples=300, deadline=None)
@given(value=_JSON | _mangled_review())
def test_review_problem_never_raises(value: Any) -> None:
    problem = review_problem(value)
    if problem is not None:
        uid, message = problem
        assert message.startswith("malformed AdmissionReview: ") and len(message) < 400
        assert uid is None or isinstance(uid, str)
