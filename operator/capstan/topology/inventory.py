"""Node inventory: free GPUs per node and each node's place in the topology.

Built from plain Kubernetes JSON (``Node`` and ``Pod`` dicts as ``kubectl get -o json`` or the API
client's ``to_dict()`` with camelCase keys). The inventory is immutable: :meth:`Inventory.allocate`
and :meth:`Inventory.release` return a new inventory that shares the static topology, so a caller
can place a queue of gangs one after another and throw away what-if copies cheaply.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from itertools import compress
from typing import TYPE_CHECKING, Any

from capstan.changes import Seen
from capstan.fields import dig
from capstan.labels import GPU_PRODUCT_LABEL, GPU_RESOURCE, RDMA_PREFIX

from .levels import DEFAULT_LEVELS, TopologyLevels

if TYPE_CHECKING:
    from .gang import PlacementResult

_HARD_EFFECTS = frozenset({"NoSchedule", "NoExecute"})
_TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})
_SUFFIX = {
    "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}

Taint = tuple[str, str, str]  # (key, value, effect)


def parse_count(value: Any) -> int:
    """Whole units of a Kubernetes quantity ("8", 8, "1k", "500m" -> 0); malformed -> 0."""
    if value is None:
        return 0
    if isinstance(value, int | float):
        return int(value)
    text = str(value).strip()
    if text.isdigit():  # the common case ("8"), without the Decimal detour
        return int(text)
    if text.endswith("m"):  # milli-units: extended resources are whole, so this rounds down
        try:
            return int(Decimal(text[:-1]) / 1000)
        except InvalidOperation:
            return 0
    for suffix in ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E"):
        if text.endswith(suffix):
            number, mult = text[: -len(suffix)], _SUFFIX[suffix]
            break
    else:
        number, mult = text, 1
    try:
        return int(Decimal(number) * mult)
    except InvalidOperation:
        return 0


def tolerates(tolerations: Iterable[Mapping[str, Any]], taint: Taint) -> bool:
    """Kubernetes toleration matching for one taint (key/operator/value/effect)."""
    key, value, effect = taint
    for tol in tolerations:
        t_effect = tol.get("effect") or ""
        if t_effect and t_effect != effect:
            continue
        t_key = tol.get("key") or ""
        op = tol.get("operator") or "Equal"
        if not t_key:
            if op == "Exists":  # empty key + Exists tolerates everything
                return True
            continue
        if t_key != key:
            continue
        if op == "Exists" or (tol.get("value") or "") == value:
            return True
    return False


def pod_gpu_request(pod: Mapping[str, Any]) -> int:
    """Effective GPU request of a pod, following the scheduler's init-container rule.

    Regular containers and restartable (sidecar) init containers add up; a plain init container
    runs alone, so the pod needs the max of that sum and any single init container.
    """
    spec = pod.get("spec") or {}

    def gpus(container: Mapping[str, Any]) -> int:
        res = container.get("resources") or {}
        req = dig(res, "requests", GPU_RESOURCE)
        if req is None:  # extended resources: limits alone imply an equal request
            req = dig(res, "limits", GPU_RESOURCE)
        return parse_count(req)

    total = sum(gpus(c) for c in spec.get("containers") or [])
    init_peak = 0
    for c in spec.get("initContainers") or []:
        if c.get("restartPolicy") == "Always":
            total += gpus(c)
        else:
            init_peak = max(init_peak, gpus(c))
    return max(total, init_peak)


@dataclass(frozen=True)
class NodeInfo:
    """Static facts about one schedulable-in-principle (Ready) node."""

    name: str
    gpus: int  # allocatable nvidia.com/gpu
    product: str | None
    rdma: bool  # any rdma/* allocatable > 0
    cordoned: bool  # spec.unschedulable
    taints: tuple[Taint, ...]  # NoSchedule/NoExecute only; PreferNoSchedule never blocks
    domain_values: tuple[str, ...]  # label value per level (the node name if it has none)


@dataclass(kw_only=True)
class _Topology:
    """Static, shared index of nodes and domains; never mutated after build, but for the caches
    below (each entry is computed from the index and what it is keyed by, so a stale one is never
    read)."""

    levels: TopologyLevels
    nodes: tuple[NodeInfo, ...]
    index: dict[str, int]
    names: list[str]  # node names in index order, for hot loops
    # dom_of[level][node] -> domain id; domain ids are ordered by domain key, so "lowest id"
    # breaks ties by name deterministically.
    dom_of: list[list[int]]
    dom_keys: list[list[str]]
    dom_values: list[list[str]]
    # children[level][domain] -> domain ids one level down (level 0: node indices); the last
    # entry (index len(levels)) is the cluster root with the widest domains as children.
    children: list[list[list[int]]]
    # parent[level][domain] -> domain id one level up (levels below the widest only)
    parent: list[list[int]]
    alloc: list[int]  # allocatable GPUs per node, for hot loops
    most_alloc: int  # the most GPUs one node has allocatable (0 with none)
    # whether the narrowest level's domains are the nodes themselves, in index order (no node has
    # a clique label): that level's sums are then the per-node lists, shared rather than copied
    node_domains: bool
    uncordoned: list[bool]  # per node, for eligibility at C speed
    tainted: list[int]  # indices of the nodes with a hard taint
    not_ready: tuple[str, ...]
    eligible_cache: dict[tuple[Any, ...], list[bool]] = field(default_factory=dict)
    # per constraint set: workers each domain holds empty, per level, and the most any domain holds
    empty_cache: dict[tuple[Any, ...], tuple[list[list[int]], list[int]]] = field(default_factory=dict)
    # per constraint set: the last sums an inventory close to its counted pods started from, and the
    # usage they hold, so the next pass over this index (pods counted again) derives its sums by the
    # nodes that changed
    room_cache: dict[tuple[Any, ...], tuple[list[int], _Room]] = field(default_factory=dict)
    # id(pod) -> (that pod, the index of the node it holds GPUs on or -1, its GPU request), for the
    # pods last counted: a watch cache hands out the same object for a pod until it changes, so
    # the next count reads only the ones that did (the pod is held so its id cannot be reused)
    pod_gpus: dict[int, tuple[Mapping[str, Any], int, int]] = field(default_factory=dict)
    # the list those pods came in (the next count derives only for the pods new since), and the
    # GPUs they hold per node; None: the next count reads every pod of its list
    pods_seen: Seen[Mapping[str, Any]] | None = None
    pods_used: list[int] | None = None
    # per level: node indices of each domain, in index order; built when first asked for
    members_cache: dict[int, list[list[int]]] = field(default_factory=dict)

    def members(self, li: int) -> list[list[int]]:
        """Node indices (in index order) of each domain of level ``li``."""
        out = self.members_cache.get(li)
        if out is None:
            out = [[] for _ in self.dom_keys[li]]
            for i, d in enumerate(self.dom_of[li]):
                out[d].append(i)
            self.members_cache[li] = out
        return out


@dataclass
class _Room:
    """Free GPUs and whole workers of one size per node and per domain of every level, for one
    eligibility (constraint set). Shared between placements on an inventory; its lists never
    change while it can be read: only a room derived for an inventory that took over its own
    (:meth:`Inventory._take_usage`) may reuse them, and this one is then spent."""

    elig: list[bool]
    gpw: int
    free: list[int]  # per node; 0 where not eligible
    cap: list[int]  # per node: free // gpw
    dcap: list[list[int]]  # per level, per domain: sum of cap
    dfree: list[list[int]]  # per level, per domain: sum of free
    # ``free`` and ``dfree`` are another room's too (same usage and eligibility, another worker size)
    shared: bool = field(default=False, compare=False)
    # kept by the index for the next pass: its lists are never reused
    pinned: bool = field(default=False, compare=False)
    # its per-node lists went to a room derived from it: emptied, never to be read again
    spent: bool = field(default=False, compare=False)
    # the nodes with room for a worker and the fewest free GPUs, for a one-worker gang: (upto,
    # nodes by free GPUs), where every node whose free GPUs are from gpw up to ``upto`` is listed
    # under that count, in index order. Found when first asked (tightest), then patched by
    # updated, so the next tightest nodes are at hand when the tightest fill up
    tight: tuple[int, dict[int, list[int]]] | None = field(default=None, compare=False)

    def tightest(self, most_alloc: int) -> tuple[int, list[int]]:
        """The fewest free GPUs (at least ``gpw``) any node has, and the nodes with that many, in
        index order. ``most_alloc``: the most any node has allocatable. The caller checked that
        some node has room for a worker."""
        upto, known = self.tight if self.tight is not None else (self.gpw - 1, {})
        for fewest in range(self.gpw, upto + 1):
            nodes = known.get(fewest)
            if nodes:
                return fewest, nodes
        free = self.free
        # `in` and list.index scan at C speed; a node's free GPUs are few distinct values
        for fewest in range(upto + 1, most_alloc + 1):
            if fewest in free:
                break
        else:
            raise AssertionError(f"no node has {self.gpw} free GPUs")
        nodes, i = [], -1
        try:
            while True:
                i = free.index(fewest, i + 1)
                nodes.append(i)
        except ValueError:
            pass
        self.tight = (fewest, {**known, fewest: nodes})  # the dict may be another room's too
        return fewest, nodes

    @classmethod
    def build(cls, topo: _Topology, used: list[int], elig: list[bool], gpw: int,
              like: _Room | None = None) -> _Room:
        """Sum from scratch: one pass over the nodes with free GPUs, then up the levels. ``like``:
        sums for the same usage and eligibility with another worker size, whose free GPUs (per
        node and per domain) are these too and are shared."""
        own = like is None  # free GPUs to sum here, else ``like``'s are these
        if like is None:
            free = [a - u if e and a > u else 0 for a, u, e in zip(topo.alloc, used, elig, strict=True)]
        else:
            free = like.free
            like.shared = True
        busy = list(compress(range(len(free)), free))  # the nodes with free GPUs, at C speed
        dfree = _level_sums(topo, free, busy) if like is None else like.dfree
        if gpw == 1:  # a worker a GPU: the workers are the free GPUs, summed already
            cap = list(free)
            dcap = [cap if topo.node_domains else list(dfree[0]), *(list(f) for f in dfree[1:])]
        else:
            cap = [f // gpw for f in free]
            dcap = _level_sums(topo, cap, busy)
        return cls(elig, gpw, free, cap, dcap, dfree, shared=not own)

    def updated(self, topo: _Topology, changes: Mapping[int, int], elig: list[bool] | None = None, *,
                reuse: bool = False) -> _Room:
        """The same sums after node usage changed to ``changes`` (node index -> GPUs used); with
        ``elig``, eligibility changed too, at those nodes only (``topo`` has their new facts).
        ``reuse``: nothing reads this room again, so the new one may take its per-node lists
        rather than copy them (unless the index keeps it or another room shares them)."""
        reuse = reuse and not self.pinned
        # copying two lists as long as the cluster is most of what a small change costs
        free = self.free if reuse and not self.shared else list(self.free)
        cap = self.cap if reuse else list(self.cap)
        alloc, gpw, nlev = topo.alloc, self.gpw, len(topo.levels)
        elig = self.elig if elig is None else elig
        per_node = topo.node_domains  # the narrowest level's sums are free and cap themselves
        dfree = [free if per_node else list(self.dfree[0]), *(list(f) for f in self.dfree[1:])]
        dcap = [cap if per_node else list(self.dcap[0]), *(list(c) for c in self.dcap[1:])]
        # per node: the two narrowest levels' sums; each wider one after, from the domains below
        # it that changed (domains nest), so a change to many nodes costs one step per node
        dom, free0, cap0 = topo.dom_of[0], dfree[0], dcap[0]
        up_dom, free1, cap1 = (topo.dom_of[1], dfree[1], dcap[1]) if nlev > 1 else ([], [], [])
        touched: set[int] = set()  # level-1 domains that changed
        # the tightest nodes by free GPUs, when known: the changed ones that leave or join a count
        upto, known = self.tight if self.tight is not None else (0, None)
        moved: list[tuple[int, int, int]] = []  # (node, free GPUs before, after)
        for i, used in changes.items():
            a = alloc[i]
            nf = a - used if elig[i] and a > used else 0
            df = nf - free[i]
            if not df:
                continue
            if known is not None and (gpw <= nf <= upto or gpw <= nf - df <= upto):
                moved.append((i, nf - df, nf))
            nc = nf // gpw
            dc = nc - cap[i]
            free[i], cap[i] = nf, nc
            if not per_node:
                d = dom[i]
                free0[d] += df
                cap0[d] += dc
            if up_dom:
                u = up_dom[i]
                free1[u] += df
                cap1[u] += dc
                touched.add(u)
        for li in range(2, nlev):
            up, f, c = topo.parent[li - 1], dfree[li], dcap[li]
            new_f, old_f, new_c, old_c = dfree[li - 1], self.dfree[li - 1], dcap[li - 1], self.dcap[li - 1]
            above: set[int] = set()
            for d in touched:
                p = up[d]
                f[p] += new_f[d] - old_f[d]
                c[p] += new_c[d] - old_c[d]
                above.add(p)
            touched = above
        if known is not None and moved:
            known = _moved_between(known, moved, gpw, upto)
        if reuse:  # reading it again would read the new sums: make that fail loudly instead
            self.spent = True
            self.free, self.cap, self.dcap, self.dfree, self.tight = [], [], [], [], None
        return _Room(elig, gpw, free, cap, dcap, dfree, tight=None if known is None else (upto, known))


def _moved_between(known: dict[int, list[int]], moved: Sequence[tuple[int, int, int]], gpw: int,
                   upto: int) -> dict[int, list[int]]:
    """Nodes listed by free GPUs (``gpw`` to ``upto``; see :attr:`_Room.tight`) after the nodes
    ``moved`` (node, free GPUs before, after) changed: new lists where they changed, since the
    others are another room's too."""
    gone: dict[int, set[int]] = {}
    joined: dict[int, list[int]] = {}
    for i, before, after in moved:
        if gpw <= before <= upto:
            gone.setdefault(before, set()).add(i)
        if gpw <= after <= upto:
            joined.setdefault(after, []).append(i)
    out = dict(known)
    for count in gone.keys() | joined.keys():
        out_of, into = gone.get(count, set()), joined.get(count, [])
        nodes = out.get(count, [])
        if len(out_of) + len(into) <= 16:
            nodes = list(nodes)
            for i in out_of:
                del nodes[bisect_left(nodes, i)]
            for i in into:
                insort(nodes, i)
        else:  # many: one pass over them (timsort merges the sorted runs)
            nodes = sorted([j for j in nodes if j not in out_of] + into)
        out[count] = nodes
    return out


def _level_sums(topo: _Topology, per_node: list[int], busy: list[int]) -> list[list[int]]:
    """Per level, per domain: the sum of ``per_node`` (zero but at the nodes ``busy``); the
    narrowest level's is ``per_node`` itself where the nodes are its domains."""
    if topo.node_domains:
        sums = [per_node]
    else:
        dom, level = topo.dom_of[0], [0] * len(topo.dom_keys[0])
        for i in busy:
            level[dom[i]] += per_node[i]
        sums = [level]
    for li in range(1, len(topo.levels)):  # each level from the one below: domains nest
        up, below = topo.parent[li - 1], sums[-1]
        some = busy if li == 1 and topo.node_domains else list(compress(range(len(below)), below))
        level = [0] * len(topo.dom_keys[li])
        for d in some:
            level[up[d]] += below[d]
        sums.append(level)
    return sums


# rooms derived from a parent inventory's only while the change is this small a share of the nodes
_DERIVE_SHARE = 4
# sums to derive from, the usage changes since them (node index -> GPUs used, applied in order), how
# many entries those hold, and whether every inventory between holds no more (see _take_usage)
_Derivation = tuple[_Room, tuple[dict[int, int], ...], int, bool]


class Inventory:
    """GPU capacity and usage of the Ready nodes of a cluster, indexed by topology domain.

    Use :func:`build_inventory` to make one. Instances are immutable: ``allocate``/``release``
    return new inventories (cheap: one list copy) and leave ``self`` unchanged. Per-domain sums
    that placement computes are kept with the inventory and carried to the ones derived from it
    by the nodes that changed, so a queue pass that places gang after gang does not sum every
    node again for each; the index keeps the last ones too, so the next pass over the same Nodes
    (:meth:`with_pods`) derives its sums the same way.
    """

    __slots__ = ("_base", "_drift", "_rooms", "_topo", "_used")

    def __init__(self, topo: _Topology, used: list[int], base: dict[Any, _Derivation] | None = None,
                 drift: int = 0) -> None:
        self._topo = topo
        self._used = used
        self._rooms: dict[Any, _Room] = {}
        # per constraint set: the last sums of an inventory this one derives from, and the usage
        # that changed since (what the sums here derive from)
        self._base = base or {}
        # node usages changed (with repeats) since the pods were counted: a view far from them
        # (a what-if with most nodes filled) keeps no sums for the next pass to derive from
        self._drift = drift

    # -- read access ---------------------------------------------------------------------------
    @property
    def levels(self) -> TopologyLevels:
        """The topology levels this inventory was indexed with."""
        return self._topo.levels

    @property
    def nodes(self) -> tuple[NodeInfo, ...]:
        """Ready nodes, sorted by name (cordoned and tainted ones included, flagged)."""
        return self._topo.nodes

    @property
    def not_ready(self) -> tuple[str, ...]:
        """Names of nodes left out because they are not Ready."""
        return self._topo.not_ready

    def node(self, name: str) -> NodeInfo:
        """Static facts about node ``name`` (KeyError if unknown or NotReady)."""
        return self._topo.nodes[self._topo.index[name]]

    def used(self, name: str) -> int:
        """GPUs requested on ``name`` by bound pods and by allocations made here."""
        return self._used[self._topo.index[name]]

    def free(self, name: str) -> int:
        """Allocatable minus used GPUs on ``name`` (never negative)."""
        i = self._topo.index[name]
        return max(0, self._topo.nodes[i].gpus - self._used[i])

    @property
    def total_gpus(self) -> int:
        """Allocatable GPUs over all Ready nodes."""
        return sum(n.gpus for n in self._topo.nodes)

    @property
    def free_gpus(self) -> int:
        """Free GPUs over all Ready nodes (schedulable or not)."""
        return sum(a - u for a, u in zip(self._topo.alloc, self._used, strict=True) if a > u)

    def domain_of(self, name: str, level: str) -> str:
        """Unique key of the domain that holds node ``name`` at ``level`` (e.g. "block=b1/rack=r3")."""
        li = self.levels.index(level)
        return self._topo.dom_keys[li][self._topo.dom_of[li][self._topo.index[name]]]

    def span_level(self, names: Sequence[str]) -> str:
        """Narrowest level at which all ``names`` share one domain ("cluster" if none)."""
        idx = [self._topo.index[n] for n in names]
        for li in range(len(self.levels)):
            dom = self._topo.dom_of[li]
            first = dom[idx[0]]
            if all(dom[i] == first for i in idx):
                return self.levels.levels[li].name
        return "cluster"

    # -- changes (return new inventories) -------------------------------------------------------
    def with_pods(self, pods: Iterable[Mapping[str, Any]]) -> Inventory:
        """The same nodes with the GPUs ``pods`` hold, counted as :func:`build_inventory` does.

        The node index (domains, eligibility, capacities) is shared, not rebuilt: for a caller
        that knows the Node objects have not changed since this inventory was built from them.
        A pod that is the very object counted last time on this index is not read again (a
        watch cache replaces an object that changes): never change a pod in place between counts.
        """
        return Inventory(self._topo, _usage(self._topo, pods))

    def with_node_updates(self, nodes: Iterable[Mapping[str, Any]]) -> Inventory | None:
        """The same usage on the index patched with new objects for some of its Ready nodes (count
        the pods again with :meth:`with_pods`): for a caller that knows the other Nodes have not
        changed since this inventory was built from them. A cordon, a taint, allocatable GPUs or
        a product label change only those nodes' facts; the domains are kept, and what was
        cached from the old facts (eligibility, sums) is carried over, corrected at those nodes.

        None when a patch cannot say it (a node not in the index, gone NotReady, or moved to
        other domains): build the inventory again then.
        """
        topo = self._topo
        infos = list(topo.nodes)
        changed: set[int] = set()
        for node in nodes:
            read = _read_node(node, topo.levels)
            if read is None or isinstance(read, str):
                return None
            info, keys = read
            i = topo.index.get(info.name)
            if i is None or info.domain_values != infos[i].domain_values or any(
                    key != topo.dom_keys[li][topo.dom_of[li][i]] for li, key in enumerate(keys)):
                return None
            infos[i] = info
            changed.add(i)
        patched = replace(topo, **_per_node(infos, topo, changed), eligible_cache={}, empty_cache={},
                          room_cache={}, pod_gpus=dict(topo.pod_gpus), pods_seen=None, pods_used=None)
        _carry_caches(topo, patched, sorted(changed))
        return Inventory(patched, self._used)

    def allocate(self, result: PlacementResult) -> Inventory:
        """A new inventory with the GPUs of a placed ``result`` taken.

        Raises ValueError if the result is not placed or would overcommit a node.
        """
        if not result.placed:
            raise ValueError(f"cannot allocate unplaced gang {result.name!r}")
        return self.add_usage(result.gpus_by_node(), check=True)

    def release(self, result: PlacementResult) -> Inventory:
        """A new inventory with the GPUs of ``result`` given back (usage floors at zero)."""
        if not result.placed:
            return self
        return self.add_usage({n: -g for n, g in result.gpus_by_node().items()}, check=False)

    def add_usage(self, delta: Mapping[str, int], *, check: bool = False) -> Inventory:
        """A new inventory with ``delta`` GPUs added to (negative: removed from) each node's usage.

        Unknown nodes are ignored (they may have gone NotReady since the placement). With
        ``check`` a node pushed past its allocatable raises ValueError.
        """
        return self._with_usage(delta, check=check, reuse=False)

    def _take_usage(self, delta: Mapping[str, int], *, check: bool = False) -> Inventory:
        """:meth:`add_usage` for a caller that drops this inventory and never reads it again (a
        queue pass's own views, one start after another): the new one takes over its per-node
        lists (usage, and the sums derived from it) where nothing else holds them, instead of
        copying lists as long as the cluster for each start. This one is emptied: reading it
        fails loudly, never with the new one's numbers."""
        return self._with_usage(delta, check=check, reuse=True)

    def _with_usage(self, delta: Mapping[str, int], *, check: bool, reuse: bool) -> Inventory:
        """:meth:`_take_usage` when ``reuse``, else :meth:`add_usage`: for a caller whose view is
        its own only from its second change on."""
        get, alloc, used = self._topo.index.get, self._topo.alloc, self._used
        changes: dict[int, int] = {}
        for name, gpus in delta.items():  # checked before any change, so a raise changes nothing
            i = get(name)
            if i is None:
                continue
            after = used[i] + gpus
            changes[i] = after if after > 0 else 0
            if check and after > alloc[i]:
                raise ValueError(f"node {name} would have {after} GPUs used of {alloc[i]}")
        base = self._derive_base(changes, reuse)
        # the index keeps the usage its sums were last derived for: that list is never reused
        if not reuse or any(kept is used for kept, _ in self._topo.room_cache.values()):
            used = list(used)
        if reuse:
            self._used, self._rooms, self._base = [], {}, {}
        for i, after in changes.items():
            used[i] = after
        return Inventory(self._topo, used, base, self._drift + len(changes))

    def _derive_base(self, changes: dict[int, int], reuse: bool = False) -> dict[Any, _Derivation]:
        # each constraint set's latest sums, here or in an inventory this one derives from, so a
        # chain of allocations derives every set's sums from the last ones asked for; merged only
        # when used, and dropped once the changes (counted with repeats) pass the share
        limit = len(self._used) // _DERIVE_SHARE
        out: dict[Any, _Derivation] = {
            key: (room, (changes,), len(changes), reuse) for key, room in self._rooms.items()}
        for key, (room, since, size, owned) in self._base.items():
            if key not in out and size + len(changes) <= limit:
                out[key] = (room, (*since, changes), size + len(changes), reuse and owned)
        return out if len(changes) <= limit else {}

    # -- internals for the placement modules ----------------------------------------------------
    def _room(self, tolerations: Sequence[Mapping[str, Any]], needs_rdma: bool, product: str | None,
              avoid: frozenset[str], gpw: int) -> _Room:
        """Free GPUs and room for workers of ``gpw`` GPUs per node and domain, for these constraints."""
        key = (self._eligible_key(tolerations, needs_rdma, product, avoid), gpw)
        room = self._rooms.get(key)
        if room is None:
            parent = self._base.get(key)
            if parent is not None and not parent[0].spent:  # spent: another view took its lists
                merged: dict[int, int] = {}
                for changes in parent[1]:
                    merged.update(changes)
                room = parent[0].updated(self._topo, merged, reuse=parent[3])
            else:
                room = self._room_from_index(key, tolerations, needs_rdma, product, avoid, gpw)
            self._rooms[key] = room
        return room

    def _room_from_index(self, key: tuple[Any, ...], tolerations: Sequence[Mapping[str, Any]],
                         needs_rdma: bool, product: str | None, avoid: frozenset[str], gpw: int) -> _Room:
        """Sums for an inventory that derives from none here: from the last ones the index kept
        (another pass's) when few nodes changed since, else from scratch. Kept for the next pass
        unless this inventory is a view far from the counted pods."""
        topo, used = self._topo, self._used
        kept = topo.room_cache.get(key)
        room = None
        if kept is not None:
            old_used, old_room = kept
            if old_used == used:
                return old_room
            changes = {i: u for i, (u, o) in enumerate(zip(used, old_used, strict=True)) if u != o}
            if len(changes) * _DERIVE_SHARE <= len(used):
                room = old_room.updated(topo, changes)
        if room is None:
            # the same constraints with another worker size here: its free GPUs are these
            like = next((r for (e, _), r in self._rooms.items() if e == key[0]), None)
            room = _Room.build(topo, used, self._eligible(tolerations, needs_rdma, product, avoid), gpw, like)
        if kept is None or self._drift * _DERIVE_SHARE <= len(used):
            if len(topo.room_cache) > 256:  # bound memory for odd callers
                topo.room_cache.clear()
            topo.room_cache[key] = (used, room)
            room.pinned = True
        return room

    def _empty(self, tolerations: Sequence[Mapping[str, Any]], needs_rdma: bool, product: str | None,
               avoid: frozenset[str], gpw: int) -> tuple[list[list[int]], list[int]]:
        """Per level, per domain: workers of ``gpw`` GPUs it holds with every GPU free; and per
        level, the most one domain holds. Static: cached with the topology."""
        key = (self._eligible_key(tolerations, needs_rdma, product, avoid), gpw)
        cached = self._topo.empty_cache.get(key)
        if cached is not None:
            return cached
        elig = self._eligible(tolerations, needs_rdma, product, avoid)
        topo = self._topo
        cap = [a // gpw if e else 0 for a, e in zip(topo.alloc, elig, strict=True)]
        if topo.node_domains:
            sums = cap
        else:
            sums = [0] * len(topo.dom_keys[0])
            dom = topo.dom_of[0]
            for i, c in enumerate(cap):
                if c:
                    sums[dom[i]] += c
        out = [sums]
        for li in range(1, len(topo.levels)):  # each level from the one below: domains nest
            up = topo.parent[li - 1]
            sums = [0] * len(topo.dom_keys[li])
            for d, c in enumerate(out[-1]):
                if c:
                    sums[up[d]] += c
            out.append(sums)
        if len(topo.empty_cache) > 256:  # bound memory for odd callers
            topo.empty_cache.clear()
        entry = topo.empty_cache[key] = (out, [max(sums, default=0) for sums in out])
        return entry

    @staticmethod
    def _eligible_key(tolerations: Sequence[Mapping[str, Any]], needs_rdma: bool, product: str | None,
                      avoid: frozenset[str]) -> tuple[Any, ...]:
        return (_freeze(tolerations), needs_rdma, product, avoid)

    def _eligible(self, tolerations: Sequence[Mapping[str, Any]], needs_rdma: bool,
                  product: str | None, avoid: frozenset[str] = frozenset()) -> list[bool]:
        """Per node: may a pod with these constraints land here? Cached per constraint set.

        ``avoid``: nodes this gang must keep off (quarantined for its job after failures).
        """
        key = self._eligible_key(tolerations, needs_rdma, product, avoid)
        cached = self._topo.eligible_cache.get(key)
        if cached is not None:
            return cached
        topo = self._topo
        nodes = topo.nodes
        out = list(topo.uncordoned)
        if needs_rdma:
            out = [ok and n.rdma for ok, n in zip(out, nodes, strict=True)]
        if product is not None:
            out = [ok and n.product == product for ok, n in zip(out, nodes, strict=True)]
        for name in avoid:
            i = topo.index.get(name)
            if i is not None:
                out[i] = False
        ok_by_taints: dict[tuple[Taint, ...], bool] = {}
        for i in topo.tainted:
            if out[i]:
                taints = nodes[i].taints
                t_ok = ok_by_taints.get(taints)
                if t_ok is None:
                    t_ok = ok_by_taints[taints] = all(tolerates(tolerations, t) for t in taints)
                out[i] = t_ok
        if len(self._topo.eligible_cache) > 256:  # bound memory for odd callers
            self._topo.eligible_cache.clear()
        self._topo.eligible_cache[key] = out
        return out


def _freeze(obj: Any) -> Any:
    if obj == ():  # most gangs tolerate nothing: no ABC check for them
        return ()
    if isinstance(obj, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in obj.items()))
    if isinstance(obj, list | tuple):
        return tuple(_freeze(v) for v in obj)
    return obj


def _is_ready(node: Mapping[str, Any]) -> bool:
    for cond in dig(node, "status", "conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False  # no Ready condition means the kubelet never reported: treat as NotReady


def _read_node(node: Mapping[str, Any], levels: TopologyLevels) -> tuple[NodeInfo, list[str]] | str | None:
    """What the index keeps of one Node: its facts and its domain key per level; its name alone
    when it is not Ready; None when it has no name."""
    nlev = len(levels)
    meta = node.get("metadata") or {}
    name = meta.get("name") or ""
    if not name:
        return None
    if not _is_ready(node):
        return name
    labels = meta.get("labels") or {}
    spec = node.get("spec") or {}
    alloc = dig(node, "status", "allocatable") or {}
    taints = tuple(sorted(
        (t.get("key") or "", t.get("value") or "", t.get("effect") or "")
        for t in spec.get("taints") or [] if t.get("effect") in _HARD_EFFECTS
    ))
    raw: list[str | None] = [str(labels[lv.label]) if labels.get(lv.label) else None for lv in levels]
    values: list[str] = []
    keys: list[str] = []
    for li in range(nlev):
        value = raw[li]
        if value is None:
            values.append(values[-1] if li else name)
            keys.append(keys[-1] if li else f"node={name}")
        else:
            path = [f"{levels.levels[j].name}={raw[j]}" for j in range(nlev - 1, li - 1, -1)
                    if raw[j] is not None]
            values.append(value)
            keys.append("/".join(path))
    info = NodeInfo(
        name=name,
        gpus=parse_count(alloc.get(GPU_RESOURCE)),
        product=labels.get(GPU_PRODUCT_LABEL),
        rdma=any(k.startswith(RDMA_PREFIX) and parse_count(v) > 0 for k, v in alloc.items()),
        cordoned=bool(spec.get("unschedulable")),
        taints=taints,
        domain_values=tuple(values),
    )
    return info, keys


def build_inventory(nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]] = (),
                    levels: TopologyLevels = DEFAULT_LEVELS) -> Inventory:
    """Index Ready nodes by topology domain and subtract GPUs held by live pods bound to them.

    A pod holds GPUs while it has ``spec.nodeName`` (or, not bound yet, is pinned to one node by
    a ``metadata.name`` affinity) and its phase is neither Succeeded nor Failed. NotReady nodes
    are left out (listed in ``Inventory.not_ready``); cordoned (``spec.unschedulable``) and
    tainted nodes stay in, flagged, so reasons can count them.
    Domain keys are label paths from the widest level down ("zone=a/block=b/rack=r"); a node
    without a level's label inherits its narrower domain (no clique label: the node itself is
    the NVLink domain), which keeps every domain nested inside one domain of each wider level.
    """
    infos: list[NodeInfo] = []
    keys_per_node: list[list[str]] = []
    not_ready: list[str] = []
    nlev = len(levels)
    for node in nodes:
        read = _read_node(node, levels)
        if read is None:
            continue
        if isinstance(read, str):
            not_ready.append(read)
            continue
        infos.append(read[0])
        keys_per_node.append(read[1])

    order = sorted(range(len(infos)), key=lambda i: infos[i].name)
    infos = [infos[i] for i in order]
    keys_per_node = [keys_per_node[i] for i in order]
    index = {n.name: i for i, n in enumerate(infos)}

    dom_of: list[list[int]] = []
    dom_keys: list[list[str]] = []
    dom_values: list[list[str]] = []
    for li in range(nlev):
        first_node: dict[str, int] = {}
        for i, keys in enumerate(keys_per_node):
            first_node.setdefault(keys[li], i)
        sorted_keys = sorted(first_node)
        kid = {k: d for d, k in enumerate(sorted_keys)}
        dom_of.append([kid[keys[li]] for keys in keys_per_node])
        dom_keys.append(sorted_keys)
        dom_values.append([infos[first_node[k]].domain_values[li] for k in sorted_keys])

    children: list[list[list[int]]] = []
    for li in range(nlev + 1):
        n_dom = len(dom_keys[li]) if li < nlev else 1
        kids: list[set[int]] = [set() for _ in range(n_dom)]
        for i in range(len(infos)):
            up_dom = dom_of[li][i] if li < nlev else 0
            kids[up_dom].add(dom_of[li - 1][i] if li else i)
        children.append([sorted(k) for k in kids])

    parent: list[list[int]] = []
    for li in range(nlev - 1):
        up = [0] * len(dom_keys[li])
        for i in range(len(infos)):
            up[dom_of[li][i]] = dom_of[li + 1][i]
        parent.append(up)

    topo = _Topology(
        levels=levels,
        index=index,
        names=[n.name for n in infos],
        dom_of=dom_of,
        dom_keys=dom_keys,
        dom_values=dom_values,
        children=children,
        parent=parent,
        node_domains=dom_of[0] == list(range(len(infos))),
        **_per_node(infos),
        not_ready=tuple(sorted(not_ready)),
    )
    return Inventory(topo, _usage(topo, pods))


def _node_eligible(n: NodeInfo, key: tuple[Any, ...]) -> bool:
    """One node's answer to :meth:`Inventory._eligible` for an eligibility cache key."""
    frozen, needs_rdma, product, avoid = key
    tolerations = [dict(t) for t in frozen]  # as _freeze left each toleration: sorted (key, value) pairs
    return (not n.cordoned and (n.rdma or not needs_rdma) and (product is None or n.product == product)
            and n.name not in avoid and all(tolerates(tolerations, t) for t in n.taints))


def _carry_caches(old: _Topology, new: _Topology, changed: Sequence[int]) -> None:
    """Fill ``new``'s caches from ``old``'s, for an index where only the nodes ``changed`` have
    other facts: each entry is corrected at those nodes instead of computed again."""
    for key, elig in old.eligible_cache.items():
        fixed = list(elig)
        for i in changed:
            fixed[i] = _node_eligible(new.nodes[i], key)
        new.eligible_cache[key] = fixed
    for (ekey, gpw), (sums, _) in old.empty_cache.items():
        was, now = old.eligible_cache.get(ekey), new.eligible_cache.get(ekey)
        if was is None or now is None:
            continue
        levels = [list(level) for level in sums]
        for i in changed:
            dc = (new.alloc[i] // gpw if now[i] else 0) - (old.alloc[i] // gpw if was[i] else 0)
            if dc:
                for li, level in enumerate(levels):
                    level[new.dom_of[li][i]] += dc
        new.empty_cache[ekey, gpw] = (levels, [max(level, default=0) for level in levels])
    for (ekey, gpw), (used, room) in old.room_cache.items():
        now = new.eligible_cache.get(ekey)
        if now is not None:
            new.room_cache[ekey, gpw] = (used, room.updated(new, {i: used[i] for i in changed}, now))


def _per_node(infos: Sequence[NodeInfo], old: _Topology | None = None,
              changed: set[int] | None = None) -> dict[str, Any]:
    """The index's per-node lists of what may change while a node keeps its domains: from
    scratch, or ``old``'s with the nodes ``changed`` (indices into ``infos``) set again."""
    if old is None or changed is None:
        return {"nodes": tuple(infos), "alloc": [n.gpus for n in infos],
                "most_alloc": max((n.gpus for n in infos), default=0),
                "uncordoned": [not n.cordoned for n in infos],
                "tainted": [i for i, n in enumerate(infos) if n.taints]}
    alloc, uncordoned = list(old.alloc), list(old.uncordoned)
    for i in changed:
        alloc[i], uncordoned[i] = infos[i].gpus, not infos[i].cordoned
    tainted = sorted((set(old.tainted) - changed) | {i for i in changed if infos[i].taints})
    return {"nodes": tuple(infos), "alloc": alloc, "most_alloc": max(alloc, default=0),
            "uncordoned": uncordoned, "tainted": tainted}


def _usage(topo: _Topology, pods: Iterable[Mapping[str, Any]]) -> list[int]:
    """GPUs per node held by live pods bound (or pinned) to it (see :func:`build_inventory`).

    The last count on this index is the start: only the pods new since are read, and those gone
    give their GPUs back (:class:`capstan.changes.Seen`).
    """
    listed = pods if isinstance(pods, list) else list(pods)
    if topo.pods_seen is None:
        topo.pods_seen = Seen()
    changes, kept = topo.pods_seen.changes(listed), topo.pods_used
    topo.pods_used = None  # until the records below agree with the list seen again
    if changes is not None and kept is not None:
        used, counted = list(kept), topo.pod_gpus
        for pod in changes.gone:
            _, at, gpus = counted.pop(id(pod))
            if at >= 0:
                used[at] -= gpus
        for pod in changes.added:
            at, gpus = _holds(topo.index, pod)
            counted[id(pod)] = (pod, at, gpus)
            if at >= 0:
                used[at] += gpus
    else:
        used = [0] * len(topo.nodes)
        seen, counted = topo.pod_gpus, {}
        for pod in listed:
            hit = seen.get(id(pod))
            if hit is None or hit[0] is not pod:
                hit = (pod, *_holds(topo.index, pod))
            counted[id(pod)] = hit
            if hit[1] >= 0:
                used[hit[1]] += hit[2]
        topo.pod_gpus = counted  # a pod listed twice: Seen has the next count read all again too
    # a copy: the inventory's own list may be changed in place by the views taken of it
    topo.pods_used = list(used)
    return used


def pinned_node(pod: Mapping[str, Any]) -> str | None:
    """The node a pod is bound to, or pinned to by a single-node ``metadata.name`` affinity."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    required = dig(spec, "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")
    terms = dig(required, "nodeSelectorTerms") or []
    for term in terms:
        for field_ in term.get("matchFields") or []:
            if field_.get("key") == "metadata.name" and field_.get("operator") == "In":
                values = field_.get("values") or []
                if len(values) == 1:
                    return str(values[0])
    return None


def _holds(index: Mapping[str, int], pod: Mapping[str, Any]) -> tuple[int, int]:
    """(index of the node ``pod`` holds GPUs on, or -1 where it holds none here; its GPUs).

    A pod pinned to a node but not bound yet holds its GPUs there already: a gang placed a moment
    ago holds its GPUs before kube-scheduler binds it.
    """
    node_name = pinned_node(pod)
    if not node_name or dig(pod, "status", "phase") in _TERMINAL_PHASES:
        return -1, 0
    at = index.get(node_name)
    return (-1, 0) if at is None else (at, pod_gpu_request(pod))
