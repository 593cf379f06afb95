"""capstan.changes.Seen: the objects new and gone between two lists of a watch cache, by identity."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from capstan.changes import Changes, Seen


def obj(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}}


def names(objs: list[dict[str, Any]]) -> list[str]:
    return [o["metadata"]["name"] for o in objs]


def test_a_cache_list_after_a_store_a_delete_and_an_add() -> None:
    a, b, c, d = obj("a"), obj("b"), obj("c"), obj("d")
    seen: Seen[dict[str, Any]] = Seen()
    assert seen.changes([a, b, c, d]) is None  # the first list: derive everything
    assert seen.changes([a, b, c, d]) == Changes()
    b2, e = obj("b"), obj("e")
    got = seen.changes([a, b2, d, e])  # b stored anew in its place, c deleted, e appended
    assert got is not None and (names(got.added), names(got.gone)) == (["b", "e"], ["b", "c"])
    assert got.added[0] is b2 and got.gone[0] is b
    # objects that only moved are not changes; a relist's new order is matched by id
    assert seen.changes([e, d, b2, a]) == Changes()
    f = obj("f")
    got = seen.changes([f, e, d, b2])
    assert got is not None and (got.added, got.gone) == ([f], [a])


def test_a_list_that_holds_an_object_twice_is_derived_again() -> None:
    a, b = obj("a"), obj("b")
    seen: Seen[dict[str, Any]] = Seen()
    seen.changes([a, b])
    assert seen.changes([a, a]) is None  # in place
    assert seen.changes([a, b]) is None  # the list before held one twice: no list to compare with
    assert seen.changes([a, b, a]) is None  # matched by id
    assert seen.changes([b]) is None
    assert seen.changes([b, obj("c")]) is not None


# one edit of a list: (kind, position, name of a new object)
KINDS = ["replace", "delete", "insert", "append", "move", "twice", "shuffle"]
EDITS = st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 1_000), st.integers(0, 10**6)), max_size=12)


@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 40), passes=st.lists(EDITS, min_size=1, max_size=6), seed=st.integers(0, 10**6))
def test_changes_take_the_last_list_to_the_new_one(start: int, passes: list[list[tuple[str, int, int]]],
                                                    seed: int) -> None:
    """Whatever the edits between two lists, the objects held after taking the gone ones out and
    putting the added ones in are those of the new list; None only when one is listed twice."""
    import random

    rng = random.Random(seed)
    current = [obj(f"o{k}") for k in range(start)]
    seen: Seen[dict[str, Any]] = Seen()
    assert seen.changes(current) is None
    held = {id(o): o for o in current}
    for edits in passes:
        new = list(current)
        for kind, at, tag in edits:
            k = at % (len(new) + 1)
            if kind == "replace" and k < len(new):
                new[k] = dict(new[k])
            elif kind == "delete" and k < len(new):
                del new[k]
            elif kind == "insert":
                new.insert(k, obj(f"n{tag}"))
            elif kind == "append":
                new.append(obj(f"n{tag}"))
            elif kind == "move" and k < len(new):
                new.append(new.pop(k))
            elif kind == "twice" and k < len(new):
                new.append(new[k])
            elif kind == "shuffle":
                rng.shuffle(new)
        got = seen.changes(new)
        listed_twice = len({id(o) for o in new}) < len(new)
        if got is None:
            assert listed_twice or len({id(o) for o in current}) < len(current)
            held = {id(o): o for o in new}
        else:
            assert not listed_twice
            for o in got.gone:
                assert held.pop(id(o)) is o
            for o in got.added:
                assert id(o) not in held
                held[id(o)] = o
            assert Counter(map(id, new)) == Counter(held.keys())
            # each in list order
            assert got.added == [o for o in new if any(o is a for a in got.added)]
        current = new
