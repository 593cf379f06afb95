"""Status writes are RFC 7386 merge patches computed as a diff: nothing stale survives a write."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kmock._internal.dicts import merge_patch_dict

from capstan.api.modelserving import ModelServingStatus, RolloutStatus
from capstan.api.trainingjob import PlacementStatus, TrainingJobStatus
from capstan.kube.status import merge_diff, status_merge_patch


def rfc7386_apply(target: Any, patch: Any) -> Any:
    """MergePatch(Target, Patch) exactly as the pseudocode of RFC 7386, section 2."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = rfc7386_apply(result.get(name), value)
    return result


def test_nested_removal_becomes_null() -> None:
    old = {"phase": "Progressing", "rollout": {"step": 0, "stepStartedAt": "2026-01-01T00:00:00Z"}}
    new = {"phase": "Progressing", "rollout": {"step": 1}}
    assert merge_diff(old, new) == {"rollout": {"step": 1, "stepStartedAt": None}}


def test_removed_object_and_top_level_key() -> None:
    old = {"phase": "Running", "placement": {"nodes": ["a"]}, "restartAfter": "x"}
    assert merge_diff(old, {"phase": "Restarting"}) == {
        "phase": "Restarting",
        "placement": None,
        "restartAfter": None,
    }


def test_lists_are_replaced_whole() -> None:
    old = {"conditions": [{"type": "A", "status": "True"}, {"type": "B", "status": "True"}]}
    new = {"conditions": [{"type": "A", "status": "True"}]}
    assert merge_diff(old, new) == new
    assert merge_diff(new, new) == {}


def test_equal_is_a_no_op_and_type_changes_are_sent() -> None:
    doc = {"a": 1, "b": {"c": [1, 2], "d": {"e": "f"}}}
    assert merge_diff(doc, copy.deepcopy(doc)) == {}
    assert merge_diff({"a": 1}, {"a": True}) == {"a": True}
    assert merge_diff({"a": {"b": 1}}, {"a": "scalar"}) == {"a": "scalar"}
    assert merge_diff({"a": "scalar"}, {"a": {"b": 1}}) == {"a": {"b": 1}}


def test_status_merge_patch_clears_the_step_start_of_a_passed_canary_step() -> None:
    live = ModelServingStatus(
        phase="Progressing",
        canary_revision="gpt-b",
        rollout=RolloutStatus(step=0, step_started_at="2026-01-01T00:00:00Z"),
    ).wire()
    desired = ModelServingStatus(phase="Progressing", canary_revision="gpt-b", rollout=RolloutStatus(step=1))
    patch = status_merge_patch(live, desired)
    assert patch == {"rollout": {"step": 1, "stepStartedAt": None}}
    assert rfc7386_apply(live, patch) == desired.wire()
    assert status_merge_patch(desired.wire(), desired) == {}


def test_status_merge_patch_of_a_trainingjob_and_of_no_status() -> None:
    live = TrainingJobStatus(
        phase="Running", placement=PlacementStatus(level="nvlink", domain="c1", nodes=["n1"])
    ).wire()
    desired = TrainingJobStatus(phase="Restarting", attempt=1, restart_after="2026-01-01T00:00:30Z")
    patch = status_merge_patch(live, desired)
    assert patch["placement"] is None and patch["restartAfter"] == "2026-01-01T00:00:30Z"
    assert rfc7386_apply(live, patch) == desired.wire()
    assert status_merge_patch(None, desired) == desired.wire()


json_scalars = st.one_of(st.booleans(), st.integers(), st.text(max_size=3))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.sampled_from("abcd"), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.sampled_from("abcde"), json_values, max_size=5)
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(json_objects, json_objects)
def test_round_trip_gives_new(old: dict[str, Any], new: dict[str, Any]) -> None:
    patch = merge_diff(old, new)
    assert rfc7386_apply(old, patch) == new
    assert merge_diff(new, rfc7386_apply(old, patch)) == {}


@FAST
@given(json_objects, json_objects)
def test_the_emulator_applies_merge_patches_like_rfc7386(old: dict[str, Any], new: dict[str, Any]) -> None:
    """kmock (the emulator under tests/kube) deletes nested keys on null, as RFC 7386 does.

    Its one deviation: a scalar replacing an object (or the reverse) raises instead of replacing;
    Capstan's status fields never change between object and scalar, so that case is left out.
    """
    patch = merge_diff(old, new)

    def kind_changes(a: Any, b: Any) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return any(kind_changes(a[k], b[k]) for k in a.keys() & b.keys())
        return isinstance(a, dict) != isinstance(b, dict) and a is not None and b is not None

    if not kind_changes(old, new):
        assert merge_patch_dict(old, patch) == new
