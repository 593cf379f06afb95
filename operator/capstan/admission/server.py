"""kopf's webhook server, with malformed AdmissionReviews answered cleanly before kopf sees them.

kopf assumes a well-formed review: a body that is not JSON gets a 400 whose reason is Python's
parser message, and a review whose ``request`` is missing, or whose object or metadata is not a
mapping, fails inside kopf with a KeyError or AttributeError that reaches the client as a 500.
The API server never sends such reviews, but anything that can reach the webhook port can, and a
500 says "the webhook is broken" where "your request is malformed" is the truth.

:class:`ReviewServer` checks the review's shape first (:func:`review_problem`): without a usable
``request.uid`` the answer is HTTP 400 with a plain-text reason; with one, it is an AdmissionReview
denying the request (code 400) with a message naming the bad field. A well-formed review goes to
kopf unchanged; an unexpected failure there is logged and answered with a generic 500.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import kopf

from capstan.api.loading import clip

log = logging.getLogger(__name__)

PREFIX = "malformed AdmissionReview"


def _kind_of(value: Any) -> str:
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


def _object_problem(where: str, obj: Any) -> str | None:
    """What about an object under review would break kopf before Capstan's handler sees it."""
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        return f"{where}: expected an object, got {_kind_of(obj)}"
    for key in ("apiVersion", "kind"):
        if key in obj and not isinstance(obj[key], str):
            return f"{where}.{key}: expected a string, got {_kind_of(obj[key])}"
    meta = obj.get("metadata")
    if meta is None:
        return None
    if not isinstance(meta, Mapping):
        return f"{where}.metadata: expected an object, got {_kind_of(meta)}"
    for key in ("name", "namespace", "uid", "generateName", "resourceVersion"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            return f"{where}.metadata.{key}: expected a string, got {_kind_of(meta[key])}"
    for key in ("labels", "annotations"):
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            return f"{where}.metadata.{key}: expected an object, got {_kind_of(value)}"
        for k, v in value.items():
            if not isinstance(v, str):
                return f"{where}.metadata.{key}[{clip(str(k), 60)!r}]: expected a string, got {_kind_of(v)}"
    return None


def review_problem(review: Any) -> tuple[str | None, str] | None:
    """``(uid, message)`` when ``review`` (any JSON value) is not an AdmissionReview kopf can
    serve; ``uid`` is None when there is none to answer to. None when the review is well-formed.
    """
    if not isinstance(review, Mapping):
        return None, f"{PREFIX}: expected a JSON object, got {_kind_of(review)}"
    for key in ("apiVersion", "kind"):
        if key in review and not isinstance(review[key], str):
            return None, f"{PREFIX}: {key}: expected a string, got {_kind_of(review[key])}"
    request = review.get("request")
    if not isinstance(request, Mapping):
        return None, f"{PREFIX}: request: expected an object, got {_kind_of(request)}"
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        return None, f"{PREFIX}: request.uid: expected a non-empty string, got {_kind_of(uid)}"
    resource = request.get("resource")
    if not isinstance(resource, Mapping):
        return uid, f"{PREFIX}: request.resource: expected an object, got {_kind_of(resource)}"
    for key in ("group", "version", "resource"):
        if not isinstance(resource.get(key), str):
            got = _kind_of(resource.get(key))
            return uid, f"{PREFIX}: request.resource.{key}: expected a string, got {got}"
    if not isinstance(request.get("userInfo"), Mapping):
        return uid, f"{PREFIX}: request.userInfo: expected an object, got {_kind_of(request.get('userInfo'))}"
    for key in ("operation", "subResource", "name", "namespace"):
        if request.get(key) is not None and not isinstance(request[key], str):
            return uid, f"{PREFIX}: request.{key}: expected a string, got {_kind_of(request[key])}"
    if request.get("dryRun") is not None and not isinstance(request["dryRun"], bool):
        return uid, f"{PREFIX}: request.dryRun: expected a boolean, got {_kind_of(request['dryRun'])}"
    if request.get("object") is None and request.get("oldObject") is None:
        return uid, f"{PREFIX}: request.object: missing (and no request.oldObject)"
    for key in ("object", "oldObject"):
        problem = _object_problem(f"request.{key}", request.get(key))
        if problem:
            return uid, f"{PREFIX}: {problem}"
    return None


def denial(review: Mapping[str, Any], uid: str, message: str, code: int = 400) -> dict[str, Any]:
    """An AdmissionReview answering ``uid``: not allowed, with ``message``."""
    api_version = review.get("apiVersion")
    return {
        "apiVersion": api_version if isinstance(api_version, str) else "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": False, "status": {"code": code, "message": clip(message, 1000)}},
    }


def _bad_request(message: str, status: int = 400) -> aiohttp.web.Response:
    return aiohttp.web.Response(status=status, text=clip(message, 1000) + "\n", content_type="text/plain")


class ReviewServer(kopf.WebhookServer):
    """:class:`kopf.WebhookServer` that answers malformed reviews itself (see the module doc)."""

    @staticmethod
    async def _serve(fn: Any, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            # aiohttp refuses bodies over the app's client_max_size (413) and keeps the body, so
            # kopf's own read below gets the same bytes.
            raw = await request.read()
        except aiohttp.web.HTTPException:
            raise
        except Exception:  # a client that hangs up mid-body
            return _bad_request(f"{PREFIX}: cannot read the body")
        try:
            review = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return _bad_request(f"{PREFIX}: the body is not a JSON document")
        problem = review_problem(review)
        if problem is not None:
            uid, message = problem
            if uid is None:
                return _bad_request(message)
            return aiohttp.web.json_response(denial(review, uid, message))
        try:
            return await kopf.WebhookServer._serve(fn, request)
        except aiohttp.web.HTTPException:
            raise
        except Exception:
            log.exception("admission review %s failed", clip(str(review["request"]["uid"]), 80))
            return _bad_request("the admission review failed in the webhook; see the operator log", 500)
