"""Python's cyclic garbage collector paused around one bounded, allocation-heavy computation.

A queue pass at 10,000 nodes builds thousands of short-lived lists and tuples. Reference counting
frees them; the cyclic collector only adds full sweeps over every object the operator keeps
(the watch caches: hundreds of thousands of dicts), each tens of milliseconds, in the middle of
a pass that holds the placement lock. Pausing it moves that work to after the pass, when the
collector next runs; nothing is left uncollected.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic collection inside the block; the collector is on again after it if it was before."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


__all__ = ["paused_gc"]
