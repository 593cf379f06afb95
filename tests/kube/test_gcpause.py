"""The queue pass runs with the cyclic collector paused, and leaves it as it found it."""

import gc
from collections.abc import Iterator

import pytest

from capstan.gcpause import paused_gc


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_collector_is_off_inside_and_on_again_after(collector_on: None) -> None:
    with paused_gc():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_collector_comes_back_when_the_block_raises(collector_on: None) -> None:
    with pytest.raises(RuntimeError), paused_gc():
        raise RuntimeError("pass failed")
    assert gc.isenabled()


def test_a_collector_someone_else_turned_off_stays_off(collector_on: None) -> None:
    gc.disable()
    with paused_gc():
        pass
    assert not gc.isenabled()
    gc.enable()


def test_nested_pauses_turn_it_back_on_once_the_outer_ends(collector_on: None) -> None:
    with paused_gc():
        with paused_gc():
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
