"""Reading nested fields of plain object dicts (wire form), without chains of ``(… or {}).get(…)``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def dig(obj: Any, *path: Any, default: Any = None) -> Any:
    """The value at ``path`` inside nested mappings; ``default`` where a part is missing, None or
    not a mapping.

    ``dig(pod, "spec", "nodeName")`` is ``pod["spec"]["nodeName"]`` when both exist. The value
    found is returned as it is, None included, as ``dict.get`` does; a caller that wants a mapping
    or a list writes ``dig(obj, "metadata", "labels") or {}``.
    """
    for key in path:
        # a plain dict (what JSON decodes to) first: the Mapping check is an ABC lookup, and this
        # runs for every pod and node of a 10,000-node cluster on each placement pass
        if type(obj) is not dict and not isinstance(obj, Mapping):
            return default
        if key not in obj:
            return default
        obj = obj[key]
    return obj
