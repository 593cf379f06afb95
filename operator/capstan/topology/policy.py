"""The placement queue's tunables: one definition for the operator and the placement benchmark.

* ``reserve_after_s`` — the starvation guard. A blocked gang gets a reservation (GPUs no gang
  behind it may take) once it has waited this long; before that anything behind it that fits
  starts. 0 reserves for the head at once (strict EASY backfill).
* ``guard_by_wait`` — the guard also follows the blocked gang: it is reserved for once it has
  waited ``reserve_after_s``, as long as its declared ``activeDeadlineSeconds`` and as long as the
  reservation would still make it wait (see :func:`capstan.topology.schedule_queue`).
* ``locality_slowdown`` — run-time multiplier of a gang spread over each topology level (by level
  name; a level not named counts as 1.0). With it, a Preferred gang that declares
  ``activeDeadlineSeconds`` waits for a narrower domain while the expected wait, from running
  gangs' declared limits, is under ``locality_wait_fraction`` x the run time spreading would cost
  it. None turns that wait off.
* ``migration`` — defragmentation moves (:mod:`capstan.topology.moves`): a gang that waits only
  because the idle GPUs are scattered gets whole nodes by moving single-node gangs that allow it
  (checkpoint, restart on another partly used node), also for a gang waiting for a narrower
  domain. ``moves`` says when a move is worth it: it must gain (GPUs of the waiting gang x how much
  sooner it starts) more than it costs (movers' GPUs x ``moves.restart_s`` downtime plus the work
  since their last checkpoint).
* ``defragment`` — :func:`capstan.topology.plan_defragmentation` moves for a gang that waits
  because the idle GPUs are scattered, or for room in the narrower domain it waits for. Off by
  default: its pay rule counts the waiting gang's gain only, and on the real traces the one-worker
  jobs that then queue behind it lost more (``bench/placement.py`` notes).
* ``locality_moves`` — moves also make room in a narrower domain for a gang that would start now
  but spread wider (:func:`capstan.topology.plan_locality_moves`), when the run time that saves it
  (from ``locality_slowdown`` and its declared ``activeDeadlineSeconds``) exceeds what they cost.
  While another gang waits for GPUs their movers take the nodes that gang would have spread over,
  so the move is no defragmentation for the waiting gangs (see ``defragment``).

The defaults are what ``bench/placement.py`` measures as "capstan". The slowdowns are an estimate
of all-reduce-bound training over NVLink, one rack's leaf switch, a block's spine and a zone;
clusters that measured their own should set ``CAPSTAN_LOCALITY_SLOWDOWN``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .moves import MovePolicy

RESERVE_AFTER_ENV = "CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS"
SLOWDOWN_ENV = "CAPSTAN_LOCALITY_SLOWDOWN"
FRACTION_ENV = "CAPSTAN_LOCALITY_WAIT_FRACTION"
MIGRATION_ENV = "CAPSTAN_MIGRATION"
MIGRATION_MIN_RUN_ENV = "CAPSTAN_MIGRATION_MIN_RUN_SECONDS"
GUARD_BY_WAIT_ENV = "CAPSTAN_QUEUE_GUARD_BY_WAIT"
MIGRATION_RESTART_ENV = "CAPSTAN_MIGRATION_RESTART_SECONDS"
LOCALITY_MOVES_ENV = "CAPSTAN_MIGRATION_FOR_LOCALITY"
DEFRAGMENT_ENV = "CAPSTAN_MIGRATION_DEFRAGMENT"

DEFAULT_RESERVE_AFTER_S = 86400.0
DEFAULT_SLOWDOWN: Mapping[str, float] = {
    "nvlink": 1.0, "rack": 1.15, "block": 1.3, "zone": 1.6, "cluster": 1.6,
}
DEFAULT_WAIT_FRACTION = 0.5


@dataclass(frozen=True)
class QueuePolicy:
    """How :func:`capstan.topology.schedule_queue` is run by the operator."""

    reserve_after_s: float = DEFAULT_RESERVE_AFTER_S
    guard_by_wait: bool = True
    locality_slowdown: Mapping[str, float] | None = field(default_factory=lambda: dict(DEFAULT_SLOWDOWN))
    locality_wait_fraction: float = DEFAULT_WAIT_FRACTION
    migration: bool = True
    moves: MovePolicy = field(default_factory=MovePolicy)
    locality_moves: bool = True
    defragment: bool = False

    def queue_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`schedule_queue`."""
        return {
            "reserve_after_s": self.reserve_after_s,
            "guard_by_wait": self.guard_by_wait,
            "locality_slowdown": self.locality_slowdown,
            "locality_wait_fraction": self.locality_wait_fraction,
        }


def parse_slowdown(text: str) -> dict[str, float] | None:
    """``"rack=1.15,block=1.3"`` -> ``{"rack": 1.15, "block": 1.3}``; ``"off"`` -> None.

    Raises ValueError naming the bad entry (a multiplier must be a number >= 1).
    """
    if text.strip().lower() in ("off", "none", "false", "0"):
        return None
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            factor = float(value)
        except ValueError:
            factor = float("nan")
        if not sep or not name.strip() or not factor >= 1.0:
            raise ValueError(f"{SLOWDOWN_ENV}: {part!r} is not LEVEL=MULTIPLIER with a multiplier >= 1")
        out[name.strip()] = factor
    return out


def _number(source: Mapping[str, str], name: str, ok: Callable[[float], bool], expected: str) -> float | None:
    """The number in ``source[name]``; None when unset; ValueError naming ``name`` when not ``ok``."""
    text = source.get(name, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not ok(value):  # NaN fails every comparison
        raise ValueError(f"{name}: {text!r} is not {expected}")
    return value


def queue_policy_from_env(env: Mapping[str, str]) -> QueuePolicy:
    """The queue policy from the operator's environment ``env`` (unset variables keep the
    defaults; :meth:`capstan.config.OperatorConfig.from_env` reads the environment).

    Raises ValueError with the variable's name when a value cannot be used.
    """
    default = QueuePolicy()
    reserve = _number(env, RESERVE_AFTER_ENV, lambda v: v >= 0, "a number of seconds >= 0")
    fraction = _number(env, FRACTION_ENV, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
    slowdown = env.get(SLOWDOWN_ENV, "").strip()
    migration = env_switch(env, MIGRATION_ENV)
    guard = env_switch(env, GUARD_BY_WAIT_ENV)
    min_run = _number(env, MIGRATION_MIN_RUN_ENV, lambda v: v >= 0, "a number of seconds >= 0")
    restart = _number(env, MIGRATION_RESTART_ENV, lambda v: v >= 0, "a number of seconds >= 0")
    locality_moves = env_switch(env, LOCALITY_MOVES_ENV)
    defragment = env_switch(env, DEFRAGMENT_ENV)
    moves = default.moves
    if min_run is not None:
        moves = replace(moves, min_run_s=min_run)
    if restart is not None:
        moves = replace(moves, restart_s=restart)
    return QueuePolicy(
        default.reserve_after_s if reserve is None else reserve,
        default.guard_by_wait if guard is None else guard,
        parse_slowdown(slowdown) if slowdown else default.locality_slowdown,
        default.locality_wait_fraction if fraction is None else fraction,
        migration=default.migration if migration is None else migration,
        moves=moves,
        locality_moves=default.locality_moves if locality_moves is None else locality_moves,
        defragment=default.defragment if defragment is None else defragment,
    )


def env_switch(source: Mapping[str, str], name: str) -> bool | None:
    """``on``/``true`` or ``off``/``false`` in ``source[name]``; None when unset or empty;
    ValueError naming ``name`` otherwise."""
    text = source.get(name, "").strip().lower()
    if not text:
        return None
    if text not in ("on", "off", "true", "false"):
        raise ValueError(f"{name}: {text!r} is not on or off")
    return text in ("on", "true")
