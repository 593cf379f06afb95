"""Patching a kept node index for Nodes that joined or left (added, deleted, Ready again, NotReady).

Building the index of a 10,000-node cluster reads every Node and sorts them into domains (about
0.2 s), and the first pass on a new index sums every node again for each worker size it places.
A Node added, deleted or flipping Ready changes a few entries of that index: this module inserts
and deletes them in place, in every per-node list and in the sums the index keeps, so the next
pass derives its sums as it does when only pods changed. It patches only where the domains stay
the same ones (a node joins domains that exist, and leaves none empty; the node's own NVLink
domain aside, on clusters where every node is its own): otherwise the caller builds the index
again, which is always right.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from .inventory import Inventory, NodeInfo, _node_eligible, _read_node, _Room, _Topology


def with_node_changes(inv: Inventory, nodes: Iterable[Mapping[str, Any]],
                      gone: Iterable[str]) -> Inventory | None:
    """``inv``'s usage on its index patched for ``nodes`` (new objects for Nodes that changed or
    appeared, Ready or not) and ``gone`` (names of deleted Nodes); count the pods again with
    :meth:`Inventory.with_pods`. For a caller that knows no other Node changed since ``inv`` was
    built from them. None when a patch cannot say it (a node moved to other domains, joined one
    that does not exist yet, or left one empty): build the inventory again then.
    """
    topo = inv._topo
    not_ready = set(topo.not_ready)
    leave: set[str] = set()
    join: dict[str, tuple[NodeInfo, list[str]]] = {}
    update: list[Mapping[str, Any]] = []
    for node in nodes:
        read = _read_node(node, topo.levels)
        if read is None:
            continue  # nameless: never in any index
        if isinstance(read, str):  # NotReady: out of the index
            not_ready.add(read)
            if read in topo.index:
                leave.add(read)
            continue
        name = read[0].name
        not_ready.discard(name)
        if name in topo.index:
            update.append(node)
        else:
            join[name] = read
    for name in gone:
        not_ready.discard(name)
        if name in topo.index:
            leave.add(name)
    out: Inventory | None = inv
    if leave or join or not_ready != set(topo.not_ready):
        patched = _patch(topo, inv._used, sorted(leave), [join[n] for n in sorted(join)],
                         tuple(sorted(not_ready)))
        out = None if patched is None else Inventory(*patched)
    if out is not None and update:
        out = out.with_node_updates(update)
    return out


def _patch(old: _Topology, used: list[int], leave: Sequence[str], join: Sequence[tuple[NodeInfo, list[str]]],
           not_ready: tuple[str, ...]) -> tuple[_Topology, list[int]] | None:
    """The index without the nodes ``leave`` and with ``join`` (facts and domain keys, by name),
    its caches patched alike, and ``used`` with them (0 on a node that joined); None where a
    domain would appear or empty."""
    nlev = len(old.levels)
    own = old.node_domains  # every node its own narrowest domain: those come and go with it
    m = 1 if own else 0  # the narrowest level whose domains hold several nodes
    if nlev <= m:
        return None
    gone = [old.index[name] for name in leave]
    to = _domains_joined(old, gone, join, m)
    if to is None:
        return None

    names, infos, alloc, uncordoned = list(old.names), list(old.nodes), list(old.alloc), list(old.uncordoned)
    used = list(used)
    dom_of = [list(d) for d in old.dom_of]
    dom_keys, dom_values = list(old.dom_keys), list(old.dom_values)
    parent = list(old.parent)
    if own:  # the narrowest level's entries are per node: edited as the nodes are
        dom_keys[0], dom_values[0], parent[0] = list(dom_keys[0]), list(dom_values[0]), list(parent[0])
    elig = {key: list(e) for key, e in old.eligible_cache.items()}
    empty = {key: [list(level) for level in sums] for key, (sums, _) in old.empty_cache.items()
             if key[0] in elig}
    rooms = {key: (list(kept), _copy_room(room, own)) for key, (kept, room) in old.room_cache.items()
             if key[0] in elig}
    # every per-node list, edited alike: deleted from, then inserted into in order of name
    per_node: list[list[Any]] = [names, infos, alloc, uncordoned, used, *dom_of, *elig.values(),
                                 *(kept for kept, _ in rooms.values()),
                                 *(r for _, room in rooms.values() for r in (room.free, room.cap))]
    if own:
        per_node += [dom_keys[0], dom_values[0], parent[0], *(sums[0] for sums in empty.values())]

    for i in sorted(gone, reverse=True):
        for key, sums in empty.items():
            _add(sums, dom_of, i, m, -(alloc[i] // key[1] if elig[key[0]][i] else 0))
        for room in (room for _, room in rooms.values()):
            _add(room.dfree, dom_of, i, m, -room.free[i])
            _add(room.dcap, dom_of, i, m, -room.cap[i])
        for values in per_node:
            del values[i]
    joined: list[int] = []
    for (info, keys), d in zip(join, to, strict=True):
        i = bisect_left(names, info.name)
        if own and not ((i == 0 or dom_keys[0][i - 1] < keys[0])
                        and (i == len(names) or keys[0] < dom_keys[0][i])):
            return None  # its own domain would not sort where the node does (odd clique labels)
        ok = {key: _node_eligible(info, key) for key in elig}
        doms = [0 if li < m else d if li == m else -1 for li in range(nlev)]
        for li in range(m + 1, nlev):
            doms[li] = old.parent[li - 1][doms[li - 1]]
        row: list[Any] = [info.name, info, info.gpus, not info.cordoned, 0, *doms, *ok.values(),
                          *(0 for _ in rooms)]
        for key in rooms:
            free = info.gpus if ok[key[0]] else 0
            row += [free, free // key[1]]
        if own:
            row += [f"node={info.name}", info.name, d,
                    *(info.gpus // key[1] if ok[key[0]] else 0 for key in empty)]
        for values, value in zip(per_node, row, strict=True):
            values.insert(i, value)
        for key, sums in empty.items():
            _add(sums, dom_of, i, m, sums[0][i] if own else (info.gpus // key[1] if ok[key[0]] else 0))
        for room in (room for _, room in rooms.values()):
            _add(room.dfree, dom_of, i, m, room.free[i])
            _add(room.dcap, dom_of, i, m, room.cap[i])
        joined.append(i)  # in order of name, so no later insert moves it

    if not own and len(dom_keys[0]) == len(names):
        return None  # every NVLink domain down to one node: an index of those is laid out otherwise
    # node indices held as values: old ones mapped to new, joined ones added
    index = dict(zip(names, range(len(names)), strict=True))
    new_of = _new_indices(len(old.names), gone, [bisect_left(old.names, info.name) for info, _ in join])
    children = list(old.children)
    if own:
        dom_of[0] = list(range(len(names)))
        # each node its own domain: [[0], [1], ...], the old lists as far as they go (never changed)
        ones = old.children[0][:len(names)]
        children[0] = ones + [[i] for i in range(len(ones), len(names))]
        children[1] = _remap(old.children[1], new_of, joined, dom_of[1])
    else:
        children[0] = _remap(old.children[0], new_of, joined, dom_of[0])
    tainted = sorted([new_of[i] for i in old.tainted if new_of[i] >= 0]
                     + [i for i in joined if infos[i].taints])
    room_cache: dict[tuple[Any, ...], tuple[list[int], _Room]] = {}
    for key, (kept, room) in rooms.items():
        room.elig = elig[key[0]]
        room.tight = _remap_tight(room, new_of, joined)
        room_cache[key] = (kept, room)
    topo = replace(
        old, nodes=tuple(infos), index=index, names=names, dom_of=dom_of, dom_keys=dom_keys,
        dom_values=dom_values, children=children, parent=parent, alloc=alloc,
        most_alloc=max(alloc, default=0), uncordoned=uncordoned, tainted=tainted, not_ready=not_ready,
        eligible_cache=elig, empty_cache={key: (sums, [max(level, default=0) for level in sums])
                                          for key, sums in empty.items()},
        room_cache=room_cache, members_cache={},
        # a pod counted on a node keeps its GPUs there; one counted nowhere is read again (its node
        # may have joined)
        pod_gpus={k: (pod, new_of[at], gpus) for k, (pod, at, gpus) in old.pod_gpus.items()
                  if at >= 0 and new_of[at] >= 0}, pods_seen=None, pods_used=None)
    return topo, used


def _domains_joined(old: _Topology, gone: Sequence[int], join: Sequence[tuple[NodeInfo, list[str]]],
                    m: int) -> list[int] | None:
    """The domain of level ``m`` (the narrowest holding several nodes) each node of ``join`` goes
    to, found by its key; None when one would need a new domain or a node ``gone`` would leave one
    empty (domains nest: then no wider one is new or empty either)."""
    to: list[int] = []
    for info, keys in join:
        if m == 1 and keys[0] != f"node={info.name}":
            return None  # an NVLink domain of several nodes on a cluster with none
        at = bisect_left(old.dom_keys[m], keys[m])
        if at == len(old.dom_keys[m]) or old.dom_keys[m][at] != keys[m]:
            return None
        to.append(at)
    size: dict[int, int] = {}
    for i in gone:
        d = old.dom_of[m][i]
        size[d] = size.get(d, len(old.children[m][d])) - 1
    for d in to:
        if d in size:
            size[d] += 1
    return None if any(left <= 0 for left in size.values()) else to


def _new_indices(n: int, gone: Sequence[int], joins: Sequence[int]) -> list[int]:
    """Per node of an index of ``n``: its index once the nodes ``gone`` are deleted and nodes are
    inserted before the old ones at ``joins`` (-1 for a node gone). Built a run of unmoved nodes
    at a time, at C speed."""
    out: list[int] = []
    start = offset = 0
    # at one position, a node joins before the one there leaves
    for at, leaves in sorted([(j, False) for j in joins] + [(g, True) for g in gone]):
        out.extend(range(start + offset, at + offset))
        if leaves:
            out.append(-1)
            offset, start = offset - 1, at + 1
        else:
            offset, start = offset + 1, at
    out.extend(range(start + offset, n + offset))
    return out


def _copy_room(room: _Room, own: bool) -> _Room:
    """A room with lists of its own (the index's kept one is read by inventories on the old index),
    the narrowest level's sums the per-node lists themselves where the nodes are the domains."""
    free, cap = list(room.free), list(room.cap)
    dfree = [free if own else list(room.dfree[0]), *(list(level) for level in room.dfree[1:])]
    dcap = [cap if own else list(room.dcap[0]), *(list(level) for level in room.dcap[1:])]
    return _Room(room.elig, room.gpw, free, cap, dcap, dfree, pinned=True, tight=room.tight)


def _add(sums: list[list[int]], dom_of: list[list[int]], i: int, start: int, amount: int) -> None:
    """Add ``amount`` to node ``i``'s domain at each level from ``start`` up."""
    if amount:
        for li in range(start, len(sums)):
            sums[li][dom_of[li][i]] += amount


def _remap(groups: list[list[int]], new_of: list[int], joined: Sequence[int],
           dom: list[int]) -> list[list[int]]:
    """Lists of node indices per domain, in index order, with the indices mapped to the new index
    (nodes that left dropped) and the nodes that joined added to their domain (``dom``)."""
    out = [[new_of[i] for i in group if new_of[i] >= 0] for group in groups]
    for i in joined:
        insort(out[dom[i]], i)
    return out


def _remap_tight(room: _Room, new_of: list[int],
                 joined: Sequence[int]) -> tuple[int, dict[int, list[int]]] | None:
    """The room's nodes by free GPUs (:attr:`_Room.tight`) on the new index."""
    if room.tight is None:
        return None
    upto, known = room.tight
    out = {count: [new_of[i] for i in nodes if new_of[i] >= 0] for count, nodes in known.items()}
    for i in joined:
        count = room.free[i]
        if room.gpw <= count <= upto:
            insort(out.setdefault(count, []), i)
    return upto, out
