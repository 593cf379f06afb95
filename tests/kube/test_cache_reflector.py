"""The reflector's protocol with a scripted server: resume from the last resourceVersion and
bookmark, list again after 410 Gone, keep assumed writes against older events, stop on RBAC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from capstan.kube.cache import ClusterCache, Reflector, slim_pod
from capstan.kube.client import ApiError
from capstan.kube.resources import NODES, PODS


def gpu_pod(name: str, rv: int, node: str = "n1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": str(rv)},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
        },
        "status": {"phase": "Running"},
    }


class ScriptedServer:
    """Answers lists with ``pages`` and each watch with the next script (a list of events or an error)."""

    def __init__(self, pages: list[Any], watches: list[Any]) -> None:
        self.pages, self.watches = pages, watches
        self.lists: list[str] = []  # resourceVersion each list answered with
        self.watched_from: list[str] = []
        self.closed = False
        self.done = asyncio.Event()

    async def list_page(
        self, res: Any, *, continue_: str | None = None, limit: int = 500, labels: Any = None
    ) -> dict[str, Any]:
        if isinstance(self.pages[0], Exception):  # refused, for good
            raise self.pages[0]
        items = self.pages.pop(0)
        rv = str(max((int(i["metadata"]["resourceVersion"]) for i in items), default=1))
        self.lists.append(rv)
        return {"metadata": {"resourceVersion": rv}, "items": items}

    async def watch(
        self, res: Any, resource_version: str, *, timeout_s: int = 300, labels: Any = None
    ) -> AsyncIterator[dict[str, Any]]:
        self.watched_from.append(resource_version)
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()  # hang like an idle stream until cancelled
        script = self.watches.pop(0)
        if isinstance(script, Exception):
            raise script
        for event in script:
            yield event


async def run_until_done(reflector: Reflector, server: ScriptedServer) -> None:
    task = asyncio.create_task(reflector.run())
    try:
        await asyncio.wait_for(server.done.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_resumes_from_last_event_and_bookmark_then_relists_after_410(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("capstan.kube.cache._backoff", lambda failures: 0.0)
    server = ScriptedServer(
        pages=[[gpu_pod("a", 5)], [gpu_pod("a", 5), gpu_pod("c", 40)]],
        watches=[
            [
                {"type": "ADDED", "object": gpu_pod("b", 7)},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}},
            ],
            [{"type": "DELETED", "object": gpu_pod("b", 12)}],
            [
                {
                    "type": "ERROR",
                    "object": {"kind": "Status", "code": 410, "message": "too old resource version"},
                }
            ],
        ],
    )
    reflector = Reflector(server, PODS, slim_pod)  # type: ignore[arg-type]
    await run_until_done(reflector, server)
    # first list at 5; watch from 5; resume from the bookmark (9), then from the deletion (12);
    # 410 -> a new list (at 40) and a watch from there
    assert server.watched_from == ["5", "9", "12", "40"]
    assert server.lists == ["5", "40"] and reflector.lists == 2
    assert set(reflector.objects) == {"ns/a", "ns/c"}


async def test_store_keeps_the_newer_version_and_slim_pods_drop_what_placement_ignores() -> None:
    reflector = Reflector(None, PODS, slim_pod)  # type: ignore[arg-type]
    reflector.store(gpu_pod("a", 20, node="n2"))  # assumed from a write's answer
    reflector.apply({"type": "MODIFIED", "object": gpu_pod("a", 15, node="n1")})  # older, arrives late
    assert reflector.objects["ns/a"]["spec"]["nodeName"] == "n2"
    reflector.apply({"type": "DELETED", "object": gpu_pod("a", 18)})  # older namesake's deletion
    assert "ns/a" in reflector.objects
    reflector.apply({"type": "DELETED", "object": gpu_pod("a", 21)})
    assert "ns/a" not in reflector.objects
    no_gpu = gpu_pod("web", 30)
    no_gpu["spec"]["containers"][0]["resources"] = {}
    reflector.apply({"type": "ADDED", "object": no_gpu})
    assert "ns/web" not in reflector.objects


def test_a_write_answered_after_the_deletion_event_does_not_bring_the_object_back() -> None:
    """A pod deleted at once (never bound): the watch's DELETED event can come before the DELETE's
    own answer, which still shows the pod terminating; storing that answer would leave a pod that
    no event ever removes, and its gang waiting for it for good."""
    reflector = Reflector(None, PODS, slim_pod, index_label="uid")  # type: ignore[arg-type]
    pod = gpu_pod("w", 10)
    pod["metadata"]["labels"] = {"uid": "u1"}
    reflector.store(pod)
    gone = {**pod, "metadata": {**pod["metadata"], "resourceVersion": "11", "deletionTimestamp": "now"}}
    reflector.apply({"type": "DELETED", "object": gone})
    reflector.store(gone)  # the DELETE's answer, late
    assert "ns/w" not in reflector.objects and reflector.by_label("u1") == []
    # a new pod of that name (a newer version) is kept
    reflector.store({**pod, "metadata": {**pod["metadata"], "resourceVersion": "12"}})
    assert [p["metadata"]["resourceVersion"] for p in reflector.by_label("u1")] == ["12"]


async def test_rbac_refusal_makes_placement_fall_back_to_lists_until_allowed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("capstan.kube.cache._FORBIDDEN_RETRY_S", 0.0)
    refused = ApiError(403, "Forbidden", "pods is forbidden")
    ready = Reflector(None, NODES)  # type: ignore[arg-type]
    ready.synced.set()
    # refused: the list itself
    server = ScriptedServer(pages=[refused], watches=[])
    pods = Reflector(server, PODS, slim_pod)  # type: ignore[arg-type]
    task = asyncio.create_task(pods.run())
    while not pods.forbidden:
        await asyncio.sleep(0.01)
    assert not pods.synced.is_set() and not ClusterCache(ready, pods, ready).ready  # the pass lists
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # refused: the watch, then a role is granted: a fresh list (events were missed), ready again
    server = ScriptedServer(pages=[[gpu_pod("a", 3)], [gpu_pod("a", 3), gpu_pod("b", 8)]], watches=[refused])
    pods = Reflector(server, PODS, slim_pod)  # type: ignore[arg-type]
    await run_until_done(pods, server)
    assert server.lists == ["3", "8"] and set(pods.objects) == {"ns/a", "ns/b"}
    assert ClusterCache(ready, pods, ready).ready


def test_slim_nodes_place_exactly_as_whole_ones() -> None:
    from tests.kube.conftest import gpu_node

    from capstan.kube.cache import slim_node, without_managed_fields
    from capstan.topology import build_inventory

    nodes = [gpu_node("a", clique="c1", rack="r1"), gpu_node("b", clique="c1", rack="r1"),
             gpu_node("c", gpus=4, clique="c2"), gpu_node("down", ready=False)]
    taint = {"key": "gpu", "value": "bad", "effect": "NoSchedule"}
    nodes[1]["spec"] = {"unschedulable": True, "taints": [taint]}
    nodes[2]["status"]["allocatable"]["rdma/rdma_shared_device_a"] = "1k"
    for n in nodes:  # what real Nodes carry and placement never reads
        n["status"]["images"] = [{"names": [f"registry.example/img:{i}"], "sizeBytes": 1} for i in range(50)]
        n["metadata"]["managedFields"] = [{"manager": "kubelet", "fieldsV1": {"f:status": {}}}]
    pods = [{"spec": {"nodeName": "a", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "3"}}}]},
             "status": {"phase": "Running"}}]
    whole, slim = build_inventory(nodes, pods), build_inventory([slim_node(n) for n in nodes], pods)
    assert slim.nodes == whole.nodes and slim.not_ready == whole.not_ready == ("down",)
    assert [slim.free(n.name) for n in slim.nodes] == [whole.free(n.name) for n in whole.nodes]
    assert len(str(slim_node(nodes[0]))) < len(str(nodes[0])) / 5
    assert "managedFields" not in without_managed_fields(nodes[0])["metadata"]


def test_a_write_answer_behind_the_watch_does_not_bring_back_what_a_relist_found_gone() -> None:
    """The API server restarted: the watch relisted (at 30) and the pod was no longer there. The
    answer to a DELETE sent before (the pod terminating, at 20) arrives after that: the relist
    already read past it, so it must not be stored (no event would ever remove it, and its gang
    would wait for it for good). A write newer than the watch's position is kept."""
    cache = ClusterCache(Reflector(None, NODES), Reflector(None, PODS, slim_pod), Reflector(None, NODES))
    pods = cache.pods
    pods.synced.set()
    pods.resource_version = "30"
    old = gpu_pod("w", 20)
    old["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    cache.assume(old)
    assert "ns/w" not in pods.objects
    cache.assume(gpu_pod("w2", 31))
    assert "ns/w2" in pods.objects


async def test_a_relist_tells_whoever_waits_what_changed_while_no_watch_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Events lost in a 410 (the API server restarted) are not lost to the jobs waiting on them: the
    relist reports what it found added, changed and gone."""
    monkeypatch.setattr("capstan.kube.cache._backoff", lambda failures: 0.0)
    server = ScriptedServer(
        pages=[
            [gpu_pod("a", 5), gpu_pod("b", 6), gpu_pod("c", 7)],
            [gpu_pod("a", 5), gpu_pod("b", 9), gpu_pod("d", 10)],
        ],
        watches=[[{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}]],
    )
    seen: list[tuple[str, str]] = []
    reflector = Reflector(server, PODS, slim_pod)  # type: ignore[arg-type]
    reflector.on_event = lambda kind, obj: seen.append((kind, obj["metadata"]["name"]))
    await run_until_done(reflector, server)
    assert reflector.lists == 2
    # nothing for the first list; then b changed, d came, c went (a is as it was)
    assert sorted(seen) == [("ADDED", "d"), ("DELETED", "c"), ("MODIFIED", "b")]


def test_sigusr1_logs_each_task_and_where_it_waits(caplog: pytest.LogCaptureFixture) -> None:
    """``kill -USR1`` on a running operator logs every coroutine with the frame it waits in."""
    import os

    from capstan.kube.diagnostics import DUMP_MARK, DUMP_SIGNAL, install_task_dump

    async def main() -> None:
        assert install_task_dump(asyncio.get_running_loop())
        lock = asyncio.Lock()
        await lock.acquire()

        async def waits_for_the_lock() -> None:
            async with lock:
                pass

        task = asyncio.create_task(waits_for_the_lock(), name="job-loop-gang-a")
        await asyncio.sleep(0)
        os.kill(os.getpid(), DUMP_SIGNAL)
        await asyncio.sleep(0.05)  # the loop runs the handler
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level("WARNING", logger="capstan.kube.diagnostics"):
        asyncio.run(main())
    (dump,) = [r.getMessage() for r in caplog.records if DUMP_MARK in r.getMessage()]
    assert "--- job-loop-gang-a" in dump and "waits_for_the_lock" in dump


def test_a_node_whose_update_moves_only_its_version_stays_the_same_object() -> None:
    """A Node's heartbeat changes nothing placement reads (slim form): the cache keeps the object it
    had, at the new resourceVersion, so a pass's node index built from it stays valid; a change
    placement reads (a label, a cordon) gives a new object."""
    from tests.kube.conftest import gpu_node

    from capstan.kube.cache import slim_node

    nodes = Reflector(None, NODES, slim_node)  # type: ignore[arg-type]
    node = gpu_node("a", clique="c1")
    node["metadata"]["resourceVersion"] = "5"
    nodes.apply({"type": "ADDED", "object": node})
    kept = nodes.get("a")
    beat = {**node, "metadata": {**node["metadata"], "resourceVersion": "6"},
            "status": {**node["status"], "images": [{"names": ["img:1"], "sizeBytes": 1}]}}
    nodes.apply({"type": "MODIFIED", "object": beat})
    assert nodes.get("a") is kept and kept is not None and kept["metadata"]["resourceVersion"] == "6"
    cordoned = {**beat, "metadata": {**beat["metadata"], "resourceVersion": "7"},
                "spec": {"unschedulable": True}}
    nodes.apply({"type": "MODIFIED", "object": cordoned})
    now = nodes.get("a")
    assert now is not kept and now is not None and now["spec"] == {"unschedulable": True}
    assert kept["spec"] == {}  # what an earlier pass read is left as it was
