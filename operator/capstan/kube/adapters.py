"""LoRA adapters on running servers: the I/O edge of :func:`capstan.serving.adapters.plan_adapter_actions`.

:func:`observe_servers` reads each server pod of a ModelServing (readiness, the volumes its template
mounts) and, for ready ones, ``GET /v1/models``: vLLM and the reference server list every loaded
adapter there with ``parent`` (the base) and ``root`` (the path it was loaded from).
:func:`apply_adapter_actions` sends vLLM's admin requests, ``POST /v1/load_lora_adapter`` and
``POST /v1/unload_lora_adapter`` with ``{lora_name, lora_path}``, to each pod and returns the
failures by adapter name (the next pass shows them in ``status.adapters`` and tries again).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from capstan.fields import dig
from capstan.serving.adapters import AdapterAction, ObservedServer

ADMIN_TIMEOUT_S = 60.0  # loading reads the adapter from the volume onto the GPU
MODELS_TIMEOUT_S = 5.0


def _port(pod: Mapping[str, Any], default_port: int) -> int:
    for container in dig(pod, "spec", "containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "http":
                return int(p["containerPort"])
    return default_port


def _url(ip: str, port: int, path: str) -> str:
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port}{path}"


def loaded_adapters(models: Any) -> dict[str, str]:
    """Adapter name -> path from a ``/v1/models`` answer (entries with a ``parent`` are adapters)."""
    out = {}
    for m in (models or {}).get("data") or []:
        if isinstance(m, dict) and m.get("parent") and isinstance(m.get("id"), str):
            out[m["id"]] = str(m.get("root") or "")
    return out


async def observe_servers(
    pods: Iterable[Mapping[str, Any]], default_port: int, session: aiohttp.ClientSession | None = None
) -> list[ObservedServer]:
    """Every running server pod, with the adapters its ``/v1/models`` lists (None: not read)."""
    own = session is None
    sess = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S))

    async def one(pod: Mapping[str, Any]) -> ObservedServer | None:
        status = pod.get("status") or {}
        ip = status.get("podIP")
        if not ip or status.get("phase") != "Running" or dig(pod, "metadata", "deletionTimestamp"):
            return None
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        volumes = frozenset(str(v.get("name")) for v in dig(pod, "spec", "volumes") or [])
        port = _port(pod, default_port)
        loaded: dict[str, str] | None = None
        if ready:
            try:
                async with sess.get(_url(ip, port, "/v1/models")) as resp:
                    if resp.status == 200:
                        loaded = loaded_adapters(await resp.json(content_type=None))
            except (aiohttp.ClientError, TimeoutError, ValueError):
                loaded = None
        host = f"[{ip}]" if ":" in ip else ip
        return ObservedServer(str(pod["metadata"]["name"]), f"{host}:{port}", ready, volumes, loaded)

    try:
        found = await asyncio.gather(*(one(p) for p in pods))
    finally:
        if own:
            await sess.close()
    return [s for s in found if s is not None]


async def apply_adapter_actions(
    actions: list[AdapterAction], session: aiohttp.ClientSession | None = None
) -> dict[str, str]:
    """Send the loads and unloads (each pod's in order, pods in parallel); failures by adapter name."""
    own = session is None
    sess = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S))
    by_pod: dict[str, list[AdapterAction]] = {}
    for a in actions:
        by_pod.setdefault(a.pod, []).append(a)
    failures: dict[str, str] = {}

    async def pod_actions(todo: list[AdapterAction]) -> None:
        for a in todo:
            body = {"lora_name": a.name, **({"lora_path": a.path} if a.verb == "load" else {})}
            url = f"http://{a.address}/v1/{a.verb}_lora_adapter"
            try:
                async with sess.post(url, json=body) as resp:
                    if resp.status == 200:
                        continue
                    text = (await resp.text())[:500]
                    failures[a.name] = f"{a.verb} failed on {a.pod}: HTTP {resp.status}: {text}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures[a.name] = f"{a.verb} failed on {a.pod}: {type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(pod_actions(todo) for todo in by_pod.values()))
    finally:
        if own:
            await sess.close()
    return failures
