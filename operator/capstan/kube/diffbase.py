"""kopf keeps no diff-base ("last handled configuration") on Capstan's objects at all.

kopf keeps, per object, the essence of the last state it handled (spec, labels, annotations) to
give ``on.update``/``on.field`` handlers their ``old``/``new``/``diff``, and by default writes it in
full into an annotation: a second copy of every spec value (``spec.env[*].value`` included, so a
credential put there would show up again in ``metadata.annotations``), one more write of the object
after every change of its spec, and one more annotation that GitOps tools see appear.

Capstan has no ``on.create``/``on.update``/``on.field``/``on.resume`` handler: reconciling is
level-based, in daemons woken by events, and the only changing handler, ``on.delete``, is driven by
``deletionTimestamp``, which kopf reads from the object itself. Nothing reads a diff, so none is
kept: :class:`NoDiffBaseStorage` remembers nothing and writes nothing. Every event then looks to
kopf like a first sight with no creation handler to run: it runs none and stores nothing. A new
TrainingJob or ModelServing gets one metadata write from kopf (its finalizer) instead of two.

If a handler that reads ``diff``/``old``/``new`` is ever added, it would see every event as a
creation: it must then come with a storage that keeps the fields it needs (with secrets excluded).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import kopf


class NoDiffBaseStorage(kopf.DiffBaseStorage):
    """A diff-base storage that keeps nothing (see the module docstring)."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        """An empty essence: nothing is compared, so nothing is worth copying out of the body."""
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """Nothing was stored."""
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        """Store nothing (no patch: kopf writes no annotation for it)."""


__all__ = ["NoDiffBaseStorage"]
