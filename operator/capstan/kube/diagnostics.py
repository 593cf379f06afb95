"""What a running operator is doing, on request: ``kill -USR1 <pid>`` logs every asyncio task's stack.

An operator that has stopped making progress without failing (a reconcile loop waiting on a lock,
a request that never returns) leaves nothing in its log to say where it waits. Go programs dump
their goroutines on SIGQUIT; this is the same for the operator's coroutines, and the fault tests use
it to explain a job that did not converge.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal

log = logging.getLogger(__name__)

DUMP_SIGNAL = signal.SIGUSR1
DUMP_MARK = "capstan task dump"  # first line of every dump (tests find it in the log)


def task_stacks(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """Every pending task of ``loop`` (the running one by default) with the frames it waits in."""
    tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name())
    out = io.StringIO()
    out.write(f"{DUMP_MARK}: {len(tasks)} tasks\n")
    for task in tasks:
        out.write(f"--- {task.get_name()}\n")
        task.print_stack(limit=12, file=out)
    return out.getvalue()


def install_task_dump(loop: asyncio.AbstractEventLoop) -> bool:
    """Log :func:`task_stacks` on :data:`DUMP_SIGNAL`; False where signals cannot be handled (the
    loop runs outside the main thread, as in tests that run the operator in a thread)."""

    def dump() -> None:
        log.warning("%s", task_stacks(loop))

    try:
        loop.add_signal_handler(DUMP_SIGNAL, dump)
    except (RuntimeError, ValueError, NotImplementedError):
        return False
    return True


__all__ = ["DUMP_MARK", "DUMP_SIGNAL", "install_task_dump", "task_stacks"]
