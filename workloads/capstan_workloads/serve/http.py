"""HTTP API: OpenAI-style ``POST /v1/completions`` (JSON or SSE), health, readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .app import STATE, ServerState
from .engine import SamplingParams
from .scheduler import Event, FinishEvent, QueueFull, Sequence, TokenEvent

log = logging.getLogger(__name__)


class BadRequest(ValueError):
    """Invalid request body; ``param`` names the offending field (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class CompletionRequest:
    """A validated completion request."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool


def _number(
    body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False
) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(name, f"{name} must be a number")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise BadRequest(name, f"{name} must be in {bound}, got {value}")
    return float(value)


def parse_completion_request(body: Any, state: ServerState) -> CompletionRequest:
    """Validate a completion body against the loaded model; raise :class:`BadRequest` naming the field."""
    assert state.loaded is not None
    if not isinstance(body, dict):
        raise BadRequest(None, "request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI accepts a one-element batch; larger batches are not supported
    if not isinstance(prompt, str):
        raise BadRequest("prompt", "prompt must be a string")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("n", "only n=1 is supported")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens", f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise BadRequest("seed", "seed must be a non-negative integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "stream must be a boolean")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise BadRequest("ignore_eos", "ignore_eos must be a boolean")
    tok = state.loaded.tokenizer
    ids = tok.encode(prompt, bos=state.limits.add_bos or not prompt)
    block_size = state.loaded.config.block_size
    if len(ids) >= block_size:
        raise BadRequest(
            "prompt",
            f"prompt is {len(ids)} tokens; the model's block_size is {block_size}, "
            f"so a prompt may have at most {block_size - 1} tokens",
        )
    return CompletionRequest(ids, SamplingParams(max_tokens, temperature, top_p, seed, ignore_eos), stream)


def _error(
    state: ServerState,
    status: int,
    kind: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    state.metrics.errors.labels(kind=kind).inc()
    err_type = "invalid_request_error" if status == 400 else kind
    body = {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    return web.json_response(body, status=status, headers=headers)


def _usage(fin: FinishEvent) -> dict[str, int]:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``: counts every answer by status code and times successful ones."""
    state = request.app[STATE]
    start = time.monotonic()
    state.active_requests += 1
    try:
        resp = await _completions(request, state)
    except Exception:
        log.exception("completion failed")
        resp = _error(state, 500, "internal", "internal error")
    finally:
        state.active_requests -= 1
    state.metrics.requests.labels(code=str(resp.status)).inc()
    if 200 <= resp.status < 300:
        state.metrics.request_latency.observe(time.monotonic() - start)
    return resp


async def _completions(request: web.Request, state: ServerState) -> web.StreamResponse:
    retry = {"Retry-After": str(state.limits.retry_after_seconds)}
    if state.draining:
        return _error(state, 503, "draining", "server is draining; retry on another replica", headers=retry)
    if state.scheduler is None:
        return _error(state, 503, "not_ready", "model is not loaded yet", headers=retry)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return _error(state, 400, "bad_request", "request body must be valid JSON")
    try:
        req = parse_completion_request(body, state)
    except BadRequest as exc:
        return _error(state, 400, "bad_request", str(exc), param=exc.param)

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        # Called from the scheduler thread. Non-streaming requests only need the final event,
        # which saves a loop wake-up per token.
        if req.stream or isinstance(event, FinishEvent):
            # RuntimeError: the loop is already closed (shutdown), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

    try:
        seq = state.scheduler.submit(req.prompt_ids, req.params, emit)
    except QueueFull as exc:
        return _error(state, 429, "overloaded", f"server is at capacity ({exc}); retry later", headers=retry)
    done = False
    try:
        if req.stream:
            resp, done = await _stream(request, state, queue)
            return resp
        fin = await queue.get()
        done = True
        assert isinstance(fin, FinishEvent)
        if fin.reason in ("error", "abort"):
            kind = "engine" if fin.reason == "error" else "aborted"
            return _error(
                state,
                503 if fin.reason == "abort" else 500,
                kind,
                fin.error or f"request {fin.reason}ed",
                headers=retry,
            )
        return web.json_response(_completion_body(state, seq, fin))
    finally:
        if not done:  # client went away (handler cancelled or write failed): free its slot
            state.metrics.errors.labels(kind="client_disconnect").inc()
            state.scheduler.cancel(seq)


def _completion_body(state: ServerState, seq: Sequence, fin: FinishEvent) -> dict[str, Any]:
    assert state.loaded is not None
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:24]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": [
            {
                "index": 0,
                "text": state.loaded.tokenizer.decode(seq.output),
                "logprobs": None,
                "finish_reason": fin.reason,
            }
        ],
        "usage": _usage(fin),
    }


async def _stream(
    request: web.Request, state: ServerState, queue: asyncio.Queue[Event]
) -> tuple[web.StreamResponse, bool]:
    """Server-sent events: one ``data: {chunk}`` per token, a final chunk with usage, ``data: [DONE]``."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

    def chunk(text: str, reason: str | None, usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": state.model_name,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    while True:
        events = [await queue.get()]
        while not queue.empty():  # coalesce tokens that piled up into one write
            events.append(queue.get_nowait())
        out = []
        fin: FinishEvent | None = None
        for ev in events:
            if isinstance(ev, TokenEvent):
                if ev.text:
                    out.append(chunk(ev.text, None))
            else:
                fin = ev
        if fin is not None:
            if fin.reason in ("error", "abort"):
                state.metrics.errors.labels(kind="engine" if fin.reason == "error" else "aborted").inc()
                out.append(
                    f"data: {json.dumps({'error': {'message': fin.error or fin.reason}})}\n\n".encode()
                )
            else:
                out.append(chunk("", fin.reason, _usage(fin)))
            out.append(b"data: [DONE]\n\n")
        try:
            await resp.write(b"".join(out))
            if fin is not None:
                await resp.write_eof()
        except ConnectionResetError:  # client hung up mid-stream; the caller cancels the sequence
            return resp, fin is not None
        if fin is not None:
            return resp, True


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process works; 500 once model loading has failed."""
    state = request.app[STATE]
    if state.load_error:
        return web.json_response({"status": "error", "error": state.load_error}, status=500)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only once the model is loaded and while not draining."""
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ready", "model": state.model_name})
    status = "draining" if state.draining else ("error" if state.load_error else "loading")
    return web.json_response({"status": status, "error": state.load_error}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the one model this server holds (lets OpenAI clients discover its name)."""
    state = request.app[STATE]
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": state.model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "capstan",
                }
            ],
        }
    )


def add_routes(app: web.Application) -> None:
    """Register every endpoint on ``app``."""
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
