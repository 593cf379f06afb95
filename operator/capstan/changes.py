"""Which objects of a list are new, and which are gone, since the list seen last: by identity.

A watch cache hands out the same object for a resource until the resource changes (it stores a
new object then), so whatever a pass derived from an object stays true while that object is
handed out. A pass over thousands of Pods or TrainingJobs need only derive again for the objects
that are new, and take back what it derived from those gone: :class:`Seen` finds both, at C speed
where the list kept its order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress, count, islice
from operator import is_not
from typing import Generic, TypeVar

T = TypeVar("T")

# edits walked one by one (an object replaced, deleted or inserted) before matching by id instead
_WALKED_EDITS = 64


@dataclass(frozen=True)
class Changes(Generic[T]):
    """The objects of a list that are new since the last one, and those no longer in it (each
    in list order)."""

    added: list[T] = field(default_factory=list)
    gone: list[T] = field(default_factory=list)


class Seen(Generic[T]):
    """The objects of the last list seen, held (so that no other object can take their ids)."""

    def __init__(self) -> None:
        self._list: list[T] | None = None
        self._ids: set[int] = set()

    def changes(self, objs: Sequence[T]) -> Changes[T] | None:
        """What changed from the last list to ``objs``, which becomes the last list; None on the
        first call, or when a list holds one object twice (derive everything again then)."""
        new, old = list(objs), self._list
        self._list = new
        if old is None:
            return self._reset(new)
        walked = _walk(new, old)
        if walked is None:  # the lists differ too much to walk: match by id
            ids = set(map(id, new))
            if len(ids) < len(new):
                return self._reset(new)
            added, gone = ids - self._ids, self._ids - ids
            self._ids = ids
            # in list order, at C speed
            return Changes(list(compress(new, map(added.__contains__, map(id, new)))) if added else [],
                           list(compress(old, map(gone.__contains__, map(id, old)))) if gone else [])
        if not walked[0] and not walked[1]:
            return Changes()
        return self._net(new, *walked)

    def _net(self, new: list[T], added_in: list[T], gone_in: list[T]) -> Changes[T] | None:
        """The walk's edits, less the objects that only moved; None if ``new`` holds one twice."""
        added = {id(o): o for o in added_in}
        if len(added) < len(added_in):  # one new object at two places
            return self._reset(new)
        gone = {id(o): o for o in gone_in}
        for k in added.keys() & gone.keys():  # moved to another place in the list
            del added[k], gone[k]
        ids = self._ids
        ids.difference_update(gone)
        if not ids.isdisjoint(added):  # held at another place as well: the list holds it twice
            return self._reset(new)
        ids.update(added)
        return Changes(list(added.values()), list(gone.values()))

    def _reset(self, new: list[T]) -> Changes[T] | None:
        self._ids = set(map(id, new))
        if len(self._ids) < len(new):
            self._list = None  # not a list to compare the next one with: derive all again then
        return None


def _walk(new: list[T], old: list[T]) -> tuple[list[T], list[T]] | None:
    """(objects of ``new`` not at their place in ``old``, objects of ``old`` not at their place in
    ``new``), by walking both lists at C speed from one difference to the next; None past
    :data:`_WALKED_EDITS` differences.

    A watch cache's list changes by edits of three kinds: an object replaced in its place (the
    resource changed), one deleted (those after it move up one place), one appended (a new
    resource). Each difference found is read as the one of these that lines the lists up again.
    """
    added: list[T] = []
    gone: list[T] = []
    i = j = 0
    n, m = len(new), len(old)
    for _ in range(_WALKED_EDITS):
        step = next(compress(count(), map(is_not, islice(new, i, None), islice(old, j, None))), None)
        if step is None:  # the same up to the end of the shorter
            step = min(n - i, m - j)
            added.extend(new[i + step:])
            gone.extend(old[j + step:])
            return added, gone
        i, j = i + step, j + step
        if j + 1 < m and new[i] is old[j + 1]:  # old[j] deleted
            gone.append(old[j])
            j += 1
        elif i + 1 < n and new[i + 1] is old[j]:  # new[i] inserted
            added.append(new[i])
            i += 1
        else:  # replaced
            added.append(new[i])
            gone.append(old[j])
            i, j = i + 1, j + 1
    return None
