"""The queue's tunables from the operator's environment: defaults, overrides, clear errors."""

from __future__ import annotations

import pytest

from capstan.topology import DEFAULT_SLOWDOWN, QueuePolicy, parse_slowdown, queue_policy_from_env


def test_defaults_are_the_benchmarked_policy() -> None:
    policy = queue_policy_from_env({})
    assert policy == QueuePolicy()
    assert policy.reserve_after_s == 86400 and policy.locality_wait_fraction == 0.5
    assert policy.locality_slowdown == DEFAULT_SLOWDOWN


def test_overrides() -> None:
    policy = queue_policy_from_env({
        "CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS": "3600",
        "CAPSTAN_LOCALITY_SLOWDOWN": "rack=1.1, block=1.4",
        "CAPSTAN_LOCALITY_WAIT_FRACTION": "0.25",
        "CAPSTAN_QUEUE_GUARD_BY_WAIT": "off",
    })
    assert policy.queue_kwargs() == {
        "reserve_after_s": 3600.0,
        "guard_by_wait": False,
        "locality_slowdown": {"rack": 1.1, "block": 1.4},
        "locality_wait_fraction": 0.25,
    }
    assert queue_policy_from_env({"CAPSTAN_LOCALITY_SLOWDOWN": "off"}).locality_slowdown is None


def test_migration_on_by_default_and_switchable() -> None:
    assert QueuePolicy().migration and QueuePolicy().moves.min_run_s == 600
    off = queue_policy_from_env({"CAPSTAN_MIGRATION": "off", "CAPSTAN_MIGRATION_MIN_RUN_SECONDS": "1800"})
    assert not off.migration and off.moves.min_run_s == 1800
    assert queue_policy_from_env({"CAPSTAN_MIGRATION": "On"}).migration
    assert QueuePolicy().locality_moves and not QueuePolicy().defragment
    assert queue_policy_from_env({"CAPSTAN_MIGRATION_DEFRAGMENT": "on"}).defragment
    assert not queue_policy_from_env({"CAPSTAN_MIGRATION_FOR_LOCALITY": "off"}).locality_moves
    with pytest.raises(ValueError, match="CAPSTAN_MIGRATION_FOR_LOCALITY"):
        queue_policy_from_env({"CAPSTAN_MIGRATION_FOR_LOCALITY": "sometimes"})


def test_guard_by_wait_and_move_cost_model_on_by_default_and_settable() -> None:
    default = queue_policy_from_env({})
    assert default.guard_by_wait and default.moves.restart_s == 300
    set_ = queue_policy_from_env({"CAPSTAN_QUEUE_GUARD_BY_WAIT": "false",
                                  "CAPSTAN_MIGRATION_RESTART_SECONDS": "120"})
    assert not set_.guard_by_wait and set_.moves.restart_s == 120


@pytest.mark.parametrize(("name", "value", "says"), [
    ("CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS", "a day", "'a day' is not a number of seconds"),
    ("CAPSTAN_QUEUE_RESERVE_AFTER_SECONDS", "-5", "'-5' is not a number of seconds >= 0"),
    ("CAPSTAN_LOCALITY_SLOWDOWN", "rack:1.2", "'rack:1.2' is not LEVEL=MULTIPLIER"),
    ("CAPSTAN_LOCALITY_SLOWDOWN", "rack=0.5", "'rack=0.5' is not LEVEL=MULTIPLIER with a multiplier >= 1"),
    ("CAPSTAN_LOCALITY_WAIT_FRACTION", "2", "'2' is not a fraction in (0, 1]"),
    ("CAPSTAN_MIGRATION", "sometimes", "'sometimes' is not on or off"),
    ("CAPSTAN_MIGRATION_MIN_RUN_SECONDS", "-1", "'-1' is not a number of seconds >= 0"),
    ("CAPSTAN_QUEUE_GUARD_BY_WAIT", "maybe", "'maybe' is not on or off"),
    ("CAPSTAN_MIGRATION_RESTART_SECONDS", "soon", "'soon' is not a number of seconds"),
])
def test_bad_values_name_the_variable(name: str, value: str, says: str) -> None:
    with pytest.raises(ValueError) as err:
        queue_policy_from_env({name: value})
    assert str(err.value).startswith(name) and says in str(err.value)


def test_slowdown_parser_ignores_empty_entries() -> None:
    assert parse_slowdown("rack=1.2,,") == {"rack": 1.2}
