"""The placement adapter of the TrainingJob controller: a snapshot of the cluster in, a decision out.

Gangs are not placed one by one in whatever order their reconcile loops happen to run. Every
placement is one pass of :func:`capstan.topology.schedule_queue` over the gangs Capstan has queued
(TrainingJobs in phase ``Queued`` that Capstan places) plus the gang asking now, in queue order:
priority, then age. The first gang that does not fit is the head; it gets a reservation (the
GPUs it waits for), and a gang behind it may start only outside those GPUs, so a stream of small
gangs cannot starve a big one.

As in Kueue's scheduler, a pass decides over a snapshot and returns what it decided; its caller
applies that. The shell reads a :class:`QueueSnapshot` (:func:`queue_snapshot`), calls the pure
:func:`queue_pass`, and applies the :class:`QueuePass`: the asking gang's decision goes to its
plan, the reservation and the pending moves to :class:`QueueState`, and the jobs it names are
woken. After an operator restart the next pass computes the reservation again from the cluster;
pending moves, which no pass could compute again, are also written to each mover's
``status.pendingMove`` and taken up from there (:meth:`QueueState.adopt`); for a locality move
that record also names the level the gang it makes room for is held to (``forLevel``), so after a
restart that gang still waits for its domain rather than starting spread before the moves finish.

How the queue runs is the operator's :class:`~capstan.topology.QueuePolicy` (environment, checked
at startup): by default a blocked gang gets its reservation after 24 h (before that anything
behind it that fits starts), and gangs that declare ``activeDeadlineSeconds`` get EASY backfill
(a gang whose limit ends before the head's expected start may use reserved GPUs) and the
cost-based locality wait, judged from running gangs' declared ends. This is the policy
``bench/placement.py`` measures as "capstan".

Defragmentation moves (``QueuePolicy.migration``, on by default): when a queued gang waits only
because the idle GPUs are scattered over partly used nodes, the pass may pick one-worker gangs
that allow moving (``spec.topology.migration: IfCheckpointed`` with a checkpoint to resume from)
and move them to other partly used nodes. The pass returns each move (kept in :class:`QueueState`)
and holds its destination; the moving job's loop stops its pods, and when it asks for placement again
it gets that destination. One defragmentation is in flight at a time; a move not carried out
within ``MOVE_HOLD_S`` is dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from itertools import compress, count
from operator import is_not
from typing import Any

from capstan.api.conditions import parse_time, rfc3339
from capstan.api.loading import InvalidObject, parse_object
from capstan.api.trainingjob import TERMINAL_PHASES, PendingMoveStatus, TrainingJob
from capstan.changes import Seen
from capstan.fields import dig
from capstan.gcpause import paused_gc
from capstan.labels import GPU_PRODUCT_LABEL, LABEL_ATTEMPT, LABEL_JOB_UID, LABEL_RANK
from capstan.topology import (
    DEFAULT_LEVELS,
    Decision,
    GangRequest,
    Inventory,
    MovableGang,
    Move,
    PlacementResult,
    QueuePolicy,
    Reservation,
    RunningGang,
    TopologyLevels,
    build_inventory,
    pinned_node,
    plan_defragmentation,
    plan_locality_moves,
    schedule_queue,
)
from capstan.topology.membership import with_node_changes
from capstan.training.lifecycle import PlacementDecision
from capstan.training.quarantine import avoided

MOVE_HOLD_S = 600.0  # a planned move not carried out by then is dropped (its job ended, or stalled)


@dataclass(frozen=True)
class PendingMove:
    """A move a pass decided: the job (by uid) restarts on ``move.to``; planned at ``since``."""

    move: Move
    uid: str
    since: float

    def status(self) -> dict[str, Any]:
        """The mover's ``status.pendingMove`` (wire form), so that the move outlives the operator."""
        to = self.move.to
        record = PendingMoveStatus(nodes=list(to.nodes), level=to.level or "", domain=to.domain or "",
                                   reason=self.move.reason, for_job=self.move.for_gang,
                                   for_level=self.move.for_level,
                                   decided=rfc3339(datetime.fromtimestamp(self.since, UTC)))
        return record.model_dump(by_alias=True, exclude_none=True)

    @classmethod
    def of(cls, job: TrainingJob) -> PendingMove | None:
        """The move ``job``'s status records, or None."""
        record = job.status.pending_move
        decided = parse_time(record.decided) if record is not None else None
        if record is None or decided is None or not record.nodes:
            return None
        key = queue_key(job)
        to = PlacementResult(key, True, list(record.nodes), job.spec.gpus_per_worker,
                             level=record.level or None, domain=record.domain or None)
        move = Move(key, to, record.reason, record.for_job, record.for_level or None)
        return cls(move, job.metadata.uid or "", decided.timestamp())


@dataclass
class QueueState:
    """Placement-queue memory carried from pass to pass within one operator run.

    Only the shell changes it, by applying each pass's :class:`QueuePass` (and by
    :meth:`move_for` dropping a move its job can no longer make).
    """

    reservation: Reservation | None = None  # the current head's, carried to the next pass
    # moves decided and not yet placed, by queue key of the gang that moves
    moves: dict[str, PendingMove] = field(default_factory=dict)

    def move_for(self, key: str, phase: str) -> str | None:
        """Why job ``key`` in ``phase`` should move now, or None; drops a move it can no longer make."""
        pending = self.moves.get(key)
        if pending is None:
            return None
        if phase == "Running":
            return pending.move.reason
        if phase != "Restarting":  # it ended or was suspended: nothing to move, release the hold
            del self.moves[key]
        return None

    def adopt(self, jobs: Iterable[TrainingJob], now: float) -> None:
        """Take up the moves the jobs' statuses record and memory lacks (after an operator restart):
        a move still in time, of a gang that is running or restarting for it."""
        for job in jobs:
            key = queue_key(job)
            if key in self.moves or job.status.phase not in ("Running", "Restarting"):
                continue
            pending = PendingMove.of(job)
            if pending is not None and now - pending.since <= MOVE_HOLD_S:
                self.moves[key] = pending

    def apply(self, result: QueuePass) -> None:
        """Keep what pass ``result`` leaves for the next one: the head's reservation, the moves."""
        self.reservation = result.reservation
        self.moves = dict(result.moves)


# Nodes changed since the last index, as a share of all, up to which it is patched (1/4)
_PATCH_SHARE = 4


@dataclass
class NodeIndex:
    """The Node objects the last snapshot's inventory was built from, and that inventory.

    Indexing Nodes by topology domain is most of what building an inventory costs (about 0.2 s
    at 10,000 nodes). The watch-fed cache hands out the same object for a Node until the Node
    changes in a way placement reads (:class:`capstan.kube.cache.Reflector` keeps it when only
    its resourceVersion moved), so the same objects mean the same index, and the objects that
    are new, or gone, are the Nodes that changed.
    """

    nodes: list[Mapping[str, Any]] = field(default_factory=list)
    levels: TopologyLevels | None = None
    inventory: Inventory | None = None

    def build(self, nodes: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]],
              levels: TopologyLevels) -> Inventory:
        """:func:`capstan.topology.build_inventory` of ``nodes`` and ``pods``, on the kept index
        when ``nodes`` are the very objects it was built from (only the pods are counted again),
        or on that index patched when a few Nodes changed, were added or deleted, or went
        NotReady or Ready (:func:`capstan.topology.membership.with_node_changes`)."""
        inventory: Inventory | None = None
        if self.inventory is not None and levels == self.levels:
            diff = self._diff(nodes)
            if diff is not None:
                changed, gone = diff
                if not changed and not gone:
                    return self.inventory.with_pods(pods)
                patched = with_node_changes(self.inventory, changed, gone)
                inventory = None if patched is None else patched.with_pods(pods)
        if inventory is None:
            inventory = build_inventory(nodes, pods, levels)
        self.nodes, self.levels, self.inventory = list(nodes), levels, inventory
        return inventory

    def _diff(self, nodes: Sequence[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[str]] | None:
        """The Nodes that are other objects than last time, and the names of those gone; None
        when too many changed for a patch to save anything."""
        if len(nodes) == len(self.nodes):
            at = list(compress(count(), map(is_not, nodes, self.nodes)))  # at C speed
            if not at:
                return [], []
            if all(dig(nodes[i], "metadata", "name") == dig(self.nodes[i], "metadata", "name") for i in at):
                # the same Nodes in the same order, a few changed: no need to match them by name
                return ([nodes[i] for i in at], []) if len(at) * _PATCH_SHARE <= len(nodes) else None
        before = {dig(old, "metadata", "name"): old for old in self.nodes}
        changed = [new for new in nodes if before.pop(dig(new, "metadata", "name"), None) is not new]
        gone = [name for name in before if name]
        return (changed, gone) if (len(changed) + len(gone)) * _PATCH_SHARE <= len(nodes) else None


@dataclass(frozen=True)
class QueueSnapshot:
    """The cluster one queue pass decides over, read once (under the placement lock)."""

    inventory: Inventory  # Nodes, less what bound or pinned Pods use
    queued: tuple[TrainingJob, ...] = ()  # :func:`queued_jobs`
    running: tuple[RunningGang, ...] = ()  # :func:`running_gangs`
    movable: tuple[tuple[MovableGang, str], ...] = ()  # :func:`movable_gangs`
    #: :func:`placed_without_pods`: GPUs placed gangs hold where their pods are still missing
    claimed: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    now: float = 0.0  # epoch seconds the queue ages gangs against
    policy: QueuePolicy = field(default_factory=QueuePolicy)


@dataclass(frozen=True)
class QueuePass:
    """What one queue pass decided; the shell applies it (:meth:`QueueState.apply`, wake-ups)."""

    decision: PlacementDecision  # for the gang that asked
    reservation: Reservation | None  # the head's, for the next pass
    startable: tuple[str, ...]  # uids of queued jobs this pass found room for: wake them to start
    moves: Mapping[str, PendingMove]  # moves pending after this pass, by queue key of the mover
    moving: tuple[PendingMove, ...] = ()  # moves this pass decided: wake their jobs to stop the gang


def wants_placement(job: TrainingJob) -> bool:
    """GPU gangs are placed by Capstan; CPU jobs and Kueue-managed jobs are not."""
    return job.spec.gpus_per_worker > 0 and not job.spec.queue_name


def queue_key(job: TrainingJob) -> str:
    """The job's name in the placement queue (and in reasons naming the queue head)."""
    return f"{job.metadata.namespace}/{job.metadata.name}"


def _submitted(job: TrainingJob) -> float:
    """Queue age: creation time in epoch seconds (0 when the server did not say)."""
    created = parse_time(dig(job.metadata.model_extra, "creationTimestamp"))
    return created.timestamp() if created else 0.0


_Rank = tuple[str, str, str]  # (job uid, attempt, rank) of a worker pod


class ParsedJobs:
    """TrainingJob bodies parsed once per resourceVersion: the latest version of each job (by uid),
    at most ``kept`` jobs, those written longest ago dropped first; what the placement queue
    reads of each version Capstan places (:class:`_Placed`), derived once; and that summed over
    the last pass's bodies and pods (:class:`_Kept`).

    A placement pass reads every placed or queued job of the cluster, and a burst runs one pass
    per gang: without this a burst of n jobs parses n² bodies, and every pass derives the running
    gangs of the cluster again. A resourceVersion names one content of an object, so only bodies
    as the server (or the watch cache) holds them may be looked up here, never one edited in
    memory; the models handed out are only read. One entry per job keeps memory with the jobs,
    however often their statuses change. The watch cache hands out the same object for a job
    until it changes, so a pass derives again only for the bodies and pods that are other
    objects than the last pass's.
    """

    def __init__(self, kept: int = 20_000) -> None:
        self.kept = kept
        # uid -> (resourceVersion, the job, what the queue reads of it: derived when first asked)
        self._jobs: dict[str, tuple[str, TrainingJob | None, list[_Placed | None]]] = {}
        self._sums = _Kept(self)

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, uid: object) -> bool:
        return uid in self._jobs

    def forget(self, uid: str) -> None:
        """Drop a deleted job (about 9 KB each: deleted jobs must not fill the memory to ``kept``)."""
        self._jobs.pop(uid, None)

    def get(self, body: Mapping[str, Any]) -> TrainingJob | None:
        """``body`` as a TrainingJob (None: not a valid one)."""
        entry = self._entry(body)
        return _parse_job(body) if entry is None else entry[1]

    def facts(self, body: Mapping[str, Any]) -> _Placed | None:
        """What the queue reads of ``body``; None when Capstan does not place it (or it is no
        valid job)."""
        entry = self._entry(body)
        return _placed(_parse_job(body)) if entry is None else _facts_of(entry)

    def _entry(self, body: Mapping[str, Any]) -> tuple[str, TrainingJob | None, list[_Placed | None]] | None:
        """The cache entry of ``body``'s version (parsed now if new); None without uid or version."""
        uid, version = dig(body, "metadata", "uid"), dig(body, "metadata", "resourceVersion")
        if not (isinstance(uid, str) and uid and isinstance(version, str) and version):
            return None
        held = self._jobs.get(uid)
        if held is not None and held[0] == version:
            return held
        entry: tuple[str, TrainingJob | None, list[_Placed | None]] = (version, _parse_job(body), [])
        self._jobs.pop(uid, None)  # re-inserted last: the order is that of the latest writes
        if len(self._jobs) >= self.kept:
            del self._jobs[next(iter(self._jobs))]
        self._jobs[uid] = entry
        return entry


class _Kept:
    """What the queue reads of the placed jobs among the last bodies, summed by part (the queue,
    the running and movable gangs, the ranks gangs claim), and the worker pods among the last
    pods: each body's or pod's share is added when it is new and taken back when it is gone
    (:class:`capstan.changes.Seen`), so a pass over thousands of running gangs reads only the
    few that changed. Every part is keyed by the id of the body it came from."""

    def __init__(self, parsed: ParsedJobs) -> None:
        self._parsed = parsed
        self._bodies: Seen[Mapping[str, Any]] = Seen()
        self._pods: Seen[Mapping[str, Any]] = Seen()
        self.placed: dict[int, _Placed] = {}
        self.queued: dict[int, TrainingJob] = {}
        self.moves: dict[int, TrainingJob] = {}  # jobs whose status records a pending move
        self.running: dict[int, RunningGang] = {}
        self.starting: dict[int, _Placed] = {}  # placed, start not known yet: they run from the clock
        self.movable: dict[int, tuple[MovableGang, str]] = {}
        self.movable_later: dict[int, _Placed] = {}  # movable, with nodes quarantined until a time
        # rank -> (body id, queue key, node, GPUs) of each gang claiming it (one, unless a job's
        # bodies are listed twice)
        self.wanted: dict[_Rank, list[tuple[int, str, str, int]]] = {}
        self.present: dict[_Rank, int] = {}  # worker pods listed, per rank
        self.missing: set[_Rank] = set()  # ranks wanted without a pod

    def read_bodies(self, bodies: Sequence[Mapping[str, Any]]) -> None:
        """Make the sums those of ``bodies``."""
        changes = self._bodies.changes(bodies)
        if changes is None:
            parts: tuple[dict[Any, Any], ...] = (self.placed, *self._by_body(), self.wanted)
            for part in parts:
                part.clear()
            self.missing.clear()
            added: Sequence[Mapping[str, Any]] = list(bodies)
        else:
            for body in changes.gone:
                self._drop(id(body))
            added = changes.added
        for body in added:
            facts = self._parsed.facts(body)
            if facts is not None:
                self._add(id(body), facts)

    def read_pods(self, pods: Sequence[Mapping[str, Any]]) -> None:
        """Make the worker pods counted those of ``pods``."""
        changes = self._pods.changes(pods)
        present, missing = self.present, self.missing
        if changes is None:
            present.clear()
            missing.update(self.wanted)
            added: Sequence[Mapping[str, Any]] = pods
        else:
            for rank in filter(None, map(_rank_of, changes.gone)):
                left = present[rank] - 1
                if left:
                    present[rank] = left
                else:
                    del present[rank]
                    if rank in self.wanted:
                        missing.add(rank)
            added = changes.added
        for rank in filter(None, map(_rank_of, added)):
            present[rank] = present.get(rank, 0) + 1
            missing.discard(rank)

    def _by_body(self) -> tuple[dict[int, Any], ...]:
        """The parts a placed body adds to (besides :attr:`placed` and its ranks)."""
        return self.queued, self.moves, self.running, self.starting, self.movable, self.movable_later

    def _add(self, key: int, p: _Placed) -> None:
        self.placed[key] = p
        job = p.job
        if p.phase == "Queued" and not job.spec.suspend:
            self.queued[key] = job
        if job.status.pending_move is not None:
            self.moves[key] = job
        if p.running is not None:
            self.running[key] = p.running
        elif p.current is not None and p.phase not in TERMINAL_PHASES:
            self.starting[key] = p
        if p.phase == "Running":
            if p.movable is not None:
                self.movable[key] = p.movable
            elif job.spec.movable and p.current is not None and p.running_since is not None:
                self.movable_later[key] = p
        for rank, node in p.ranks:
            self.wanted.setdefault(rank, []).append((key, queue_key(job), node, job.spec.gpus_per_worker))
            if rank not in self.present:
                self.missing.add(rank)

    def _drop(self, key: int) -> None:
        p = self.placed.pop(key, None)
        if p is None:
            return
        for part in self._by_body():
            part.pop(key, None)
        for rank, _ in p.ranks:
            claims = [c for c in self.wanted[rank] if c[0] != key]
            if claims:
                self.wanted[rank] = claims
            else:
                del self.wanted[rank]
                self.missing.discard(rank)


def _rank_of(pod: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(job uid, attempt, rank) of a TrainingJob's worker pod, by its labels; None for any other pod."""
    labels = (pod.get("metadata") or {}).get("labels")
    if not labels or LABEL_JOB_UID not in labels:
        return None
    return labels[LABEL_JOB_UID], labels.get(LABEL_ATTEMPT, ""), labels.get(LABEL_RANK, "")


def _facts_of(entry: tuple[str, TrainingJob | None, list[_Placed | None]]) -> _Placed | None:
    """The entry's :class:`_Placed`, derived when first asked for."""
    if not entry[2]:
        entry[2].append(_placed(entry[1]))
    return entry[2][0]


def _parse_job(body: Mapping[str, Any]) -> TrainingJob | None:
    try:
        job = parse_object(dict(body))
    except InvalidObject:
        return None
    return job if isinstance(job, TrainingJob) else None


@dataclass(frozen=True)
class _Placed:
    """What the placement queue reads of one version of a TrainingJob that Capstan places."""

    job: TrainingJob
    phase: str | None
    #: where its gang runs (its status placement), when that names nodes
    current: PlacementResult | None
    started: float | None  # status.startTime, epoch seconds
    limit: int | None  # activeDeadlineSeconds; None without a limit
    moved: int  # seconds its moves took (they extend the limit)
    #: as a running gang, once its start is known (before, its start is the pass's clock)
    running: RunningGang | None
    running_since: float | None  # since when its Running condition is true
    #: as a gang the queue may move, with its uid (None: it may not, or its request depends on the
    #: clock: nodes quarantined for it expire)
    movable: tuple[MovableGang, str] | None
    #: its claim on GPUs while its pods may be missing: (job uid, attempt, rank) of each worker pod
    #: and the node it is placed on (none unless Starting, Running or Lent, placed, not suspended)
    ranks: tuple[tuple[tuple[str, str, str], str], ...]


def _placed(job: TrainingJob | None) -> _Placed | None:
    """``job``'s :class:`_Placed`; None when Capstan does not place it (or it is no valid job)."""
    if job is None or not wants_placement(job):
        return None
    st, limit = job.status, job.spec.active_deadline_seconds
    current = _current(job) if st.placement is not None and st.placement.nodes else None
    at = parse_time(st.start_time)
    started = at.timestamp() if at else None
    running = None
    if current is not None and started is not None and st.phase not in TERMINAL_PHASES:
        running = _running(current, started, limit, st.moved_seconds)
    condition = next((c for c in st.conditions if c.type == "Running" and c.status == "True"), None)
    at = parse_time(condition.last_transition_time if condition else None)
    since = at.timestamp() if at else None
    movable = None
    if job.spec.movable and current is not None and since is not None and not st.excluded_nodes:
        movable = (MovableGang(gang_request(job), current, since), job.metadata.uid or "")
    ranks: tuple[tuple[tuple[str, str, str], str], ...] = ()
    if st.phase in ("Starting", "Running", "Lent") and st.placement is not None and not job.spec.suspend:
        uid, attempt = job.metadata.uid or "", str(st.attempt)
        ranks = tuple(((uid, attempt, str(rank)), node) for rank, node in enumerate(st.placement.nodes))
    return _Placed(job, st.phase, current, started, limit, st.moved_seconds, running, since, movable, ranks)


def _running(current: PlacementResult, started: float, limit: int | None, moved: int) -> RunningGang:
    """A gang running since ``started``: it ends by its limit, which its moves extend."""
    return RunningGang(current, started, None if limit is None else started + limit + moved)


class PlacedJobs:
    """The TrainingJobs Capstan places among one pass's bodies, read once for every part of the
    pass's snapshot (the queue, the running and movable gangs, the claims). With ``parsed`` (kept
    between passes) each job's part is derived once per version, and summed over the bodies by
    what changed since the last pass (:class:`_Kept`), so a pass over a cluster of thousands of
    running gangs does not read them all again. The parts come in no order that means anything:
    the queue orders what it reads."""

    def __init__(self, bodies: Sequence[Mapping[str, Any]], parsed: ParsedJobs | None = None) -> None:
        self._sums = (parsed if parsed is not None else ParsedJobs())._sums
        self._sums.read_bodies(bodies)

    def queued(self) -> list[TrainingJob]:
        """The jobs waiting in Capstan's placement queue: phase Queued, not suspended.

        Jobs never reconciled yet (no phase) are left out: they join the queue on their first
        pass, so a job a scoped-out operator never looks at cannot hold anyone back.
        """
        return list(self._sums.queued.values())

    def recorded_moves(self) -> list[TrainingJob]:
        """The jobs whose status records a pending move."""
        return list(self._sums.moves.values())

    def running(self, now: float) -> list[RunningGang]:
        """Placed gangs still holding GPUs, with their declared end where they declare one.

        The end is ``startTime + activeDeadlineSeconds`` (``now +`` the limit while the gang is
        still starting): an upper bound, since the lifecycle stops the gang there. Without a
        limit it is unknown, and the queue falls back to reservations that need no run times.
        """
        sums = self._sums
        out = list(sums.running.values())
        out.extend(_running(p.current, now, p.limit, p.moved) for p in sums.starting.values()
                   if p.current is not None)
        return out

    def movable(self, now: float | None = None) -> list[tuple[MovableGang, str]]:
        """Running gangs the queue may move, with their uids.

        A job qualifies when ``spec.movable`` (migration allowed and a checkpoint to resume from),
        it is ``Running`` with a placement, and its ``Running`` condition says since when (the
        move rule counts ``min_run_s`` from there).
        """
        sums = self._sums
        out = list(sums.movable.values())
        for p in sums.movable_later.values():
            if p.current is not None and p.running_since is not None:
                gang = MovableGang(gang_request(p.job, now), p.current, p.running_since)  # quarantines expire
                out.append((gang, p.job.metadata.uid or ""))
        return out

    def without_pods(self, pods: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
        """GPUs that placed gangs hold on nodes where their worker pod does not exist: by queue
        key, ``{node: GPUs}``.

        A gang's status names its nodes (rank r on ``placement.nodes[r]``) before its pods exist,
        and a rank whose create did not land (a namesake still terminating answered 409, a quota
        refused it) is created there later. Until then nothing on the node shows the claim:
        another gang placed on those GPUs would leave that rank Pending for good. Starting,
        Running and Lent gangs that are not suspended count; pods are matched by the job-uid,
        attempt and rank labels. A gang lent to a rollout keeps its claim: its GPUs go to the
        rollout's pods (kube-scheduler does not read claims), not to another gang of the queue.
        """
        sums = self._sums
        sums.read_pods(pods)
        claims: dict[str, dict[str, int]] = {}
        for rank in sorted(sums.missing):
            for _, key, node, gpus in sums.wanted[rank]:
                held = claims.setdefault(key, {})
                held[node] = held.get(node, 0) + gpus
        return claims


def queued_jobs(bodies: Sequence[Mapping[str, Any]], parsed: ParsedJobs | None = None) -> list[TrainingJob]:
    """:meth:`PlacedJobs.queued` of ``bodies``."""
    return PlacedJobs(bodies, parsed).queued()


def recorded_moves(
    bodies: Sequence[Mapping[str, Any]], parsed: ParsedJobs | None = None
) -> list[TrainingJob]:
    """:meth:`PlacedJobs.recorded_moves` of ``bodies``."""
    return PlacedJobs(bodies, parsed).recorded_moves()


def running_gangs(
    bodies: Sequence[Mapping[str, Any]], now: float, parsed: ParsedJobs | None = None
) -> list[RunningGang]:
    """:meth:`PlacedJobs.running` of ``bodies``."""
    return PlacedJobs(bodies, parsed).running(now)


def placed_without_pods(
    bodies: Sequence[Mapping[str, Any]], pods: Sequence[Mapping[str, Any]], parsed: ParsedJobs | None = None
) -> dict[str, dict[str, int]]:
    """:meth:`PlacedJobs.without_pods` of ``bodies``."""
    return PlacedJobs(bodies, parsed).without_pods(pods)


def _current(job: TrainingJob) -> PlacementResult:
    st = job.status
    assert st.placement is not None
    return PlacementResult(queue_key(job), True, list(st.placement.nodes), job.spec.gpus_per_worker,
                           level=st.placement.level or None, domain=st.placement.domain or None)


def movable_gangs(
    bodies: Sequence[Mapping[str, Any]], now: float | None = None, parsed: ParsedJobs | None = None
) -> list[tuple[MovableGang, str]]:
    """:meth:`PlacedJobs.movable` of ``bodies``."""
    return PlacedJobs(bodies, parsed).movable(now)


def gang_request(job: TrainingJob, now: float | None = None) -> GangRequest:
    """The job's gang as the placement queue sees it, kept off the nodes quarantined for the job
    at ``now`` (epoch seconds; None: every node its status lists)."""
    spec = job.spec
    at = datetime.fromtimestamp(now, UTC) if now is not None else None
    return GangRequest(
        name=queue_key(job),
        workers=spec.workers,
        gpus_per_worker=spec.gpus_per_worker,
        policy=spec.topology.policy,
        max_domain=spec.topology.max_domain,
        needs_rdma=spec.wants_rdma,
        tolerations=spec.pod_tolerations(),
        priority=spec.priority,
        submitted=_submitted(job),
        gpu_product=spec.node_selector.get(GPU_PRODUCT_LABEL),
        expected_duration_s=spec.active_deadline_seconds,
        avoid_nodes=avoided(job.status.excluded_nodes, at),
    )


def queue_snapshot(
    nodes: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    queued: Sequence[TrainingJob] = (),
    *,
    now: float | None = None,
    running: Sequence[RunningGang] = (),
    policy: QueuePolicy | None = None,
    movable: Sequence[tuple[MovableGang, str]] = (),
    claimed: Mapping[str, Mapping[str, int]] | None = None,
    levels: TopologyLevels = DEFAULT_LEVELS,
    node_index: NodeIndex | None = None,
) -> QueueSnapshot | None:
    """The :class:`QueueSnapshot` of the cluster's Nodes and Pods and the queued gangs; None without Nodes.

    Pods pinned by node affinity but not yet bound by the scheduler count as using their node:
    a gang placed a moment ago holds its GPUs before kube-scheduler binds it. ``now`` (epoch
    seconds) defaults to the clock; ``running`` are the placed gangs (:func:`running_gangs`),
    ``policy`` the queue's tunables (default :class:`QueuePolicy`) and ``movable``
    (:func:`movable_gangs`) the gangs a defragmentation may move. ``claimed``
    (:func:`placed_without_pods`) are GPUs placed gangs hold where their pods are still missing;
    a gang's own claim does not count against it. ``levels`` are the operator's topology levels.
    ``node_index`` (the operator's, kept between passes) reuses the last pass's index of the Nodes
    when they are the same objects (:meth:`NodeIndex.build`).
    """
    if not nodes:
        return None
    return QueueSnapshot(
        inventory=(node_index.build(nodes, pods, levels) if node_index is not None
                   else build_inventory(nodes, pods, levels)),
        queued=tuple(queued),
        running=tuple(running),
        movable=tuple(movable),
        claimed=dict(claimed or {}),
        now=time.time() if now is None else now,
        policy=policy or QueuePolicy(),
    )


def queue_pass(snapshot: QueueSnapshot, job: TrainingJob, state: QueueState) -> QueuePass:
    """One pass of the placement queue over ``snapshot``, on behalf of ``job`` about to start.

    ``state`` (read, never changed) is what earlier passes left: the head's reservation and the
    pending moves. A move not carried out within :data:`MOVE_HOLD_S` is dropped; a gang that
    moves goes where its move planned when that room is still free; otherwise ``job`` and the
    queued gangs are scheduled in queue order (:func:`capstan.topology.schedule_queue`), and with
    ``policy.migration`` and no move in flight, gangs left waiting may get defragmentation moves.
    Runs with the cyclic garbage collector paused (:mod:`capstan.gcpause`).
    """
    with paused_gc():
        return _queue_pass(snapshot, job, state)


def _queue_pass(snapshot: QueueSnapshot, job: TrainingJob, state: QueueState) -> QueuePass:
    at, policy = snapshot.now, snapshot.policy
    moves = {key: pending for key, pending in state.moves.items() if at - pending.since <= MOVE_HOLD_S}
    me = queue_key(job)
    mine = moves.pop(me, None)
    held: dict[str, int] = {}  # other moves' destinations, kept for the gangs that move there
    for pending in moves.values():
        for node, gpus in pending.move.to.gpus_by_node().items():
            held[node] = held.get(node, 0) + gpus
    for key, claim in snapshot.claimed.items():  # other gangs' ranks still to be created
        if key != me:
            for node, gpus in claim.items():
                held[node] = held.get(node, 0) + gpus
    inv = snapshot.inventory.add_usage(held)
    if mine is not None and all(inv.free(n) >= g for n, g in mine.move.to.gpus_by_node().items()):
        # the moving gang goes where its move planned
        return QueuePass(_decision(mine.move.to), state.reservation, (), moves)
    others = {queue_key(j): j for j in snapshot.queued if queue_key(j) != me}
    requests = [gang_request(j, at) for j in others.values()] + [gang_request(job, at)]
    moving: list[PendingMove] = []
    if policy.migration and policy.locality_moves and not moves and policy.locality_slowdown is not None:
        # room in a narrower domain for a gang that would start spread, when that pays
        uids = {m.request.name: uid for m, uid in snapshot.movable}
        local = plan_locality_moves(inv, requests, [m for m, _ in snapshot.movable], at,
                                    policy.locality_slowdown, policy.moves)
        moving = [PendingMove(mv, uids[mv.gang], at) for mv in local]
    # a gang that moves make room for in a narrower domain waits for that domain until they are done
    hold = {p.move.for_gang: p.move.for_level for p in [*moves.values(), *moving]
            if p.move.for_gang and p.move.for_level}
    requests = [replace(r, policy="Required", max_domain=hold[r.name]) if r.name in hold else r
                for r in requests]
    decisions = schedule_queue(
        inv, requests, running=snapshot.running, now=at, reservation=state.reservation,
        **policy.queue_kwargs(),
    )
    if policy.migration and policy.defragment and not moves and not moving:  # one in flight at a time
        moving = _plan_moves(inv, decisions, snapshot.movable, at, policy, snapshot.running)
    return QueuePass(
        decision=_decision(next(d for d in decisions if d.name == me).result),
        reservation=next((d.reservation for d in decisions if d.reservation is not None), None),
        startable=_uids(others[d.name] for d in decisions if d.placed and d.name in others),
        moves={**moves, **{pending.move.gang: pending for pending in moving}},
        moving=tuple(moving),
    )


def _uids(jobs: Iterable[TrainingJob]) -> tuple[str, ...]:
    return tuple(j.metadata.uid for j in jobs if j.metadata.uid)


def _decision(result: PlacementResult) -> PlacementDecision:
    return PlacementDecision(
        placed=result.placed,
        nodes=list(result.nodes),
        level=result.level or "",
        domain=result.domain or "",
        reason=result.reason,
    )


def _plan_moves(inv: Inventory, decisions: Sequence[Decision], movable: Sequence[tuple[MovableGang, str]],
                now: float, policy: QueuePolicy, running: Sequence[RunningGang] = ()) -> list[PendingMove]:
    """Defragmentation moves for the gangs this pass left waiting."""
    # a gang waiting for a narrower domain asks for room there
    waiting = [d.wanted() for d in decisions if not d.placed]
    if not waiting or not movable:
        return []
    started, own = [], False  # own: a view made here, which the next one may take the lists of
    for d in decisions:
        if d.placed:  # gangs starting from this pass hold their GPUs already
            gpus = d.result.gpus_by_node()
            inv = inv._with_usage(gpus, check=True, reuse=own)
            own = True
            end = d.request.expected_duration_s
            started.append(RunningGang(d.result, now, None if end is None else now + end))
    uids = {m.request.name: uid for m, uid in movable}
    moves = plan_defragmentation(inv, waiting, [m for m, _ in movable], now, policy.moves,
                                 [*running, *started])
    return [PendingMove(mv, uids[mv.gang], now) for mv in moves]


__all__ = [
    "MOVE_HOLD_S", "NodeIndex",
    "ParsedJobs", "PendingMove", "PlacedJobs", "QueuePass", "QueueSnapshot", "QueueState",
    "gang_request",
    "movable_gangs", "pinned_node", "placed_without_pods", "queue_key", "queue_pass", "queue_snapshot",
    "queued_jobs", "recorded_moves", "running_gangs", "wants_placement",
]
