"""kopf's diff-base ("last handled configuration") stored as a digest, never as a copy of the spec.

kopf keeps, per object, the essence of the last state it handled (spec, labels, annotations) to
tell a real change from a no-op, and by default writes it in full into an annotation. That copies
every value of the spec, ``spec.env[*].value`` included, so a credential put in ``spec.env`` would
show up a second time in ``metadata.annotations``, and in full in kopf's debug logs of each diff;
it also doubles the object's size against the API server's limit (a TrainingJob with a pod template
can be large). Credentials belong in a Secret that ``spec.template`` refers to (``valueFrom``,
``envFrom``); the spec then holds only the Secret's name.

Capstan has no ``on.create``/``on.update``/``on.field`` handler (reconciling is level-based, in
daemons; the only changing handler, ``on.delete``, is driven by ``deletionTimestamp``), so nothing
reads the diff's contents: kopf only needs to know *whether* the essence changed. A SHA-256 digest
of the essence answers that. The digest is unkeyed on purpose: whoever can read the annotation can
read the spec it summarises, and a restart must not make every object look changed.

If a handler that reads ``diff``/``old``/``new`` is ever added, it would see digests only; it must
then use a storage that keeps the fields it needs (with secrets still excluded).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, cast

import kopf

DIGEST_KEY = "sha256"


class DigestDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """:class:`kopf.AnnotationsDiffBaseStorage` whose essence is ``{"sha256": <digest>}``."""

    def build(self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None) -> kopf.BodyEssence:
        essence = cast(dict[str, Any], super().build(body=body, extra_fields=extra_fields))
        # Our own bookkeeping (progress, the marker) changes on its own; only the user's state counts.
        annotations = essence.get("metadata", {}).get("annotations", {})
        for key in [k for k in annotations if k.startswith(f"{self.prefix}/")]:
            del annotations[key]
        canonical = json.dumps(essence, sort_keys=True, separators=(",", ":"), default=str)
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return cast(kopf.BodyEssence, {DIGEST_KEY: digest})
