"""HTTP API: OpenAI-style ``POST /v1/completions`` and ``/v1/chat/completions`` (JSON or SSE), health,
readiness and metrics."""

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

from .adapters import Adapter, add_adapter_routes
from .app import STATE, ServerState
from .chat import ROLES, ChatTemplateError
from .engine import SamplingParams
from .scheduler import Event, FinishEvent, QueueFull, TokenEvent

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """The request names a model this server does not serve (neither the base nor a loaded adapter)."""


class BadRequest(ValueError):
    """Invalid request body; ``param`` names the offending field (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class CompletionRequest:
    """A validated completion or chat request."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    chat: bool = False
    model: str = ""  # the name the request used: the base's or a LoRA adapter's
    adapter: Adapter | None = None


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


def _integer(body: dict[str, Any], name: str, default: int, lo: int, hi: int | None = None) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise BadRequest(name, f"{name} must be an integer {bound}, got {value!r}")
    return value


def _stop(body: dict[str, Any], limit: int) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest("stop", "stop must be a string or a list of strings")
    if len(stops) > limit:
        raise BadRequest("stop", f"stop may hold at most {limit} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise BadRequest("stop", "stop strings must not be empty")
    return tuple(stops)


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """Validate chat ``messages``: a non-empty list of {role, content} with known roles and text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}]", f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        # "developer" is OpenAI's newer name for the system role.
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise BadRequest(
                f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text parts have a meaning here
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise BadRequest(
                    f"messages[{i}].content", f"messages[{i}].content parts must all be text parts"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out


def parse_completion_request(body: Any, state: ServerState, chat: bool = False) -> CompletionRequest:
    """Validate a completion (``chat``: chat completion) body; :class:`BadRequest` names the field."""
    assert state.loaded is not None and state.scheduler is not None
    if not isinstance(body, dict):
        raise BadRequest(None, "request body must be a JSON object")
    model, adapter = _model(body, state)
    prompt: Any
    if chat:
        messages = _messages(body)
        assert state.chat_template is not None
        try:
            prompt = state.chat_template.render(messages)
        except ChatTemplateError as exc:
            raise BadRequest("messages", f"messages: {exc}") from exc
        prompt_field = "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # OpenAI accepts a one-element batch; larger batches are not supported
        if not isinstance(prompt, str):
            raise BadRequest("prompt", "prompt must be a string")
        prompt_field = "prompt"
    limits = state.limits
    n = _integer(body, "n", 1, 1, limits.max_batch_size)
    # Chat's current name for the limit is max_completion_tokens; max_tokens is its older alias.
    max_name = (
        "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    )
    max_tokens = _integer(body, max_name, 16, 1)
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
    stop = _stop(body, limits.max_stop)
    ids = state.loaded.tokenizer.encode(prompt, bos=limits.add_bos or not prompt)
    block_size = state.loaded.config.block_size
    if len(ids) >= block_size:
        raise BadRequest(
            prompt_field,
            f"{prompt_field} is {len(ids)} tokens; the model's block_size is {block_size}, "
            f"so a prompt may have at most {block_size - 1} tokens",
        )
    sched = state.scheduler
    need = sched.blocks_needed(len(ids), max_tokens, n)
    if need > sched.cache.num_blocks:
        raise BadRequest(
            "n",
            f"n={n} choices of this prompt need {need} KV blocks; the server holds {sched.cache.num_blocks}",
        )
    params = SamplingParams(max_tokens, temperature, top_p, seed, ignore_eos, stop, n)
    return CompletionRequest(ids, params, stream, chat, model, adapter)


def _model(body: dict[str, Any], state: ServerState) -> tuple[str, Adapter | None]:
    """The served name a request asked for and its LoRA adapter (None: the base; no name: the base)."""
    model = body.get("model")
    if model is None or model == state.model_name:
        return state.model_name, None
    if not isinstance(model, str):
        raise BadRequest("model", "model must be a string")
    adapter = state.adapters.get(model) if state.adapters is not None else None
    if adapter is None:
        raise ModelNotFound(model)
    return model, adapter


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


def _not_found(state: ServerState, model: str) -> web.Response:
    """404 for an unknown model name, worded as OpenAI and vLLM do."""
    state.metrics.errors.labels(kind="model_not_found").inc()
    body = {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                      "param": "model", "code": 404}}
    return web.json_response(body, status=404)


def _usage(fins: list[FinishEvent]) -> dict[str, int]:
    """Usage of a request: the prompt once, the completion tokens of every choice."""
    prompt = fins[0].prompt_tokens
    completion = sum(f.completion_tokens for f in fins)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/completions``."""
    return await _serve(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: ``messages`` rendered by the chat template, then completed."""
    return await _serve(request, chat=True)


async def _serve(request: web.Request, chat: bool) -> web.StreamResponse:
    """Counts every answer by status code and times successful ones."""
    state = request.app[STATE]
    start = time.monotonic()
    state.active_requests += 1
    try:
        resp = await _generate(request, state, chat)
    except Exception:
        log.exception("completion failed")
        resp = _error(state, 500, "internal", "internal error")
    finally:
        state.active_requests -= 1
    state.metrics.requests.labels(code=str(resp.status)).inc()
    if 200 <= resp.status < 300:
        state.metrics.request_latency.observe(time.monotonic() - start)
    return resp


async def _generate(request: web.Request, state: ServerState, chat: bool) -> web.StreamResponse:
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
        req = parse_completion_request(body, state, chat)
    except BadRequest as exc:
        return _error(state, 400, "bad_request", str(exc), param=exc.param)
    except ModelNotFound as exc:
        return _not_found(state, str(exc))

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        # Called from the scheduler thread. Non-streaming requests only need the final events,
        # which saves a loop wake-up per token.
        if req.stream or isinstance(event, FinishEvent):
            # RuntimeError: the loop is already closed (shutdown), so nobody is listening.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, event)

    try:
        submitted = state.scheduler.submit(req.prompt_ids, req.params, emit, req.adapter)
    except QueueFull as exc:
        return _error(state, 429, "overloaded", f"server is at capacity ({exc}); retry later", headers=retry)
    done = False
    try:
        if req.stream:
            resp, done = await _stream(request, state, queue, req)
            return resp
        fins: list[FinishEvent] = []
        while len(fins) < req.params.n:
            ev = await queue.get()
            assert isinstance(ev, FinishEvent)
            fins.append(ev)
        done = True
        failed = next((f for f in fins if f.reason in ("error", "abort")), None)
        if failed is not None:
            kind = "engine" if failed.reason == "error" else "aborted"
            return _error(
                state,
                503 if failed.reason == "abort" else 500,
                kind,
                failed.error or f"request {failed.reason}ed",
                headers=retry,
            )
        return web.json_response(_body(req.model, sorted(fins, key=lambda f: f.index), req.chat))
    finally:
        if not done:  # client went away (handler cancelled or write failed): free its slots
            state.metrics.errors.labels(kind="client_disconnect").inc()
            state.scheduler.cancel(submitted)


def _body(model: str, fins: list[FinishEvent], chat: bool) -> dict[str, Any]:
    if chat:
        choices: list[dict[str, Any]] = [
            {
                "index": f.index,
                "message": {"role": "assistant", "content": f.text},
                "logprobs": None,
                "finish_reason": f.reason,
            }
            for f in fins
        ]
    else:
        choices = [
            {"index": f.index, "text": f.text, "logprobs": None, "finish_reason": f.reason} for f in fins
        ]
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": _usage(fins),
    }


async def _stream(
    request: web.Request, state: ServerState, queue: asyncio.Queue[Event], req: CompletionRequest
) -> tuple[web.StreamResponse, bool]:
    """Server-sent events: ``data: {chunk}`` per token and choice, a final chunk per choice, ``data: [DONE]``.

    Chat chunks are ``chat.completion.chunk`` objects whose first delta of each choice carries the
    role; the last choice to finish carries the request's usage.
    """
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    chat, n = req.chat, req.params.n
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    started: set[int] = set()
    fins: list[FinishEvent] = []

    def chunk(index: int, text: str, reason: str | None, usage: dict[str, int] | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if chat:
            delta: dict[str, str] = {}
            if index not in started:
                delta["role"] = "assistant"
            if text or index not in started:
                delta["content"] = text
            started.add(index)
            choice |= {"delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice |= {"text": text, "logprobs": None, "finish_reason": reason}
        body: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": req.model,
            "choices": [choice],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    while True:
        events = [await queue.get()]
        while not queue.empty():  # coalesce tokens that piled up into one write
            events.append(queue.get_nowait())
        out = []
        failed: FinishEvent | None = None
        for ev in events:
            if isinstance(ev, TokenEvent):
                # A chat choice opens with its role as soon as its first token exists (time to first token).
                if ev.text or (chat and ev.index not in started):
                    out.append(chunk(ev.index, ev.text, None))
            else:
                fins.append(ev)
                if ev.reason in ("error", "abort"):
                    failed = ev
                    break
                if ev.tail:
                    out.append(chunk(ev.index, ev.tail, None))
                out.append(chunk(ev.index, "", ev.reason, _usage(fins) if len(fins) == n else None))
        end = failed is not None or len(fins) == n
        if failed is not None:
            state.metrics.errors.labels(kind="engine" if failed.reason == "error" else "aborted").inc()
            err = {"error": {"message": failed.error or failed.reason}}
            out.append(f"data: {json.dumps(err)}\n\n".encode())
        if end:
            out.append(b"data: [DONE]\n\n")
        try:
            await resp.write(b"".join(out))
            if end:
                await resp.write_eof()
        except ConnectionResetError:  # client hung up mid-stream; the caller cancels the request
            return resp, end
        if end:
            # A failed choice means the whole batch failed (engine error) or the server stops: every
            # other choice of the request ends the same way, nothing is left to cancel.
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
        q = state.quantized
        return web.json_response({
            "status": "ready", "model": state.model_name, "device": str(state.device),
            "quantization": q.mode if q else "none", "weightBytes": q.bytes_after if q else None,
        })
    status = "draining" if state.draining else ("error" if state.load_error else "loading")
    return web.json_response({"status": status, "error": state.load_error}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: the base model, then each LoRA adapter (``parent``: the base; ``root``: where
    it was loaded from, as vLLM lists them), so clients and the operator see what is served."""
    state = request.app[STATE]
    created = int(state.started)
    data = [{"id": state.model_name, "object": "model", "created": created, "owned_by": "capstan",
             "root": str(state.model_dir), "parent": None}]
    for adapter in state.adapters.all() if state.adapters is not None else []:
        data.append({"id": adapter.name, "object": "model", "created": created, "owned_by": "capstan",
                     "root": adapter.path, "parent": state.model_name})
    return web.json_response({"object": "list", "data": data})


def add_routes(app: web.Application) -> None:
    """Register every endpoint on ``app``."""
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    add_adapter_routes(app, lambda: app[STATE].adapters)
