"""Checkpoint progress that rank 0 reports, and the operator's requests to save now (pure).

Rank 0 of the reference trainer reports its progress two ways (``capstan_workloads.progress``):

* on its metrics endpoint, while it runs: ``capstan_train_checkpoint_step`` (-1: none yet),
  ``capstan_train_checkpoint_timestamp_seconds``, ``capstan_train_resumed_from_step`` (-1: a fresh
  start) and ``capstan_train_checkpoint_request`` (the last request it answered; the gauge being
  there says the trainer answers requests at all);
* as a ``capstan-progress {json}`` line, in its termination message when it exits and at the end of
  its output (so ``terminationMessagePolicy: FallbackToLogsOnError`` carries it when it crashes).

The operator asks for a checkpoint by annotating rank 0's pod ``capstan.dev/checkpoint-request:
"<id>:<mode>"`` (mode ``save``, ``stop`` or ``cancel``); the trainer reads it through a downward-API
volume, saves, waits for the commit and reports ``<id>``. Under ``stop`` it then holds (no more
steps) until the pod is deleted, so the stop loses no work whatever the termination grace period.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

PROGRESS_PREFIX = "capstan-progress "
#: How often a pending request is looked at again (a scrape of rank 0).
REQUEST_RECHECK_S = 2.0
#: How often a running gang's progress is read when nothing else wakes the job.
PROGRESS_RECHECK_S = 60.0


@dataclass(frozen=True)
class Progress:
    """What rank 0 said about its checkpoints (None: it did not say)."""

    checkpoint_step: int | None = None
    checkpoint_time: str | None = None  # RFC 3339
    resumed_from_step: int | None = None  # None: unknown; -1: a fresh start
    request: int | None = None  # last request answered; None: requests not supported


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _time(value: Any) -> str | None:
    """An RFC 3339 time from unix seconds (a number) or a string, as given."""
    if isinstance(value, str):
        return value or None
    seconds = _int(value)
    if seconds is None or seconds <= 0:
        return None
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_line(progress: Progress) -> str:
    """The ``capstan-progress {json}`` line that reports ``progress`` (see :func:`parse_progress`)."""
    body = {
        "checkpointStep": progress.checkpoint_step,
        "checkpointTime": progress.checkpoint_time,
        "resumedFromStep": progress.resumed_from_step,
        "request": progress.request,
    }
    return PROGRESS_PREFIX + json.dumps({k: v for k, v in body.items() if v is not None}, sort_keys=True)


def parse_progress(text: str) -> Progress | None:
    """The last ``capstan-progress`` line of a termination message (or a log tail); None without one.

    A line that does not parse is skipped: the message is the container's to write."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if not line.startswith(PROGRESS_PREFIX):
            continue
        try:
            body = json.loads(line.removeprefix(PROGRESS_PREFIX))
        except ValueError:
            continue
        if not isinstance(body, dict):
            continue
        step = _int(body.get("checkpointStep"))
        return Progress(
            checkpoint_step=step if step is not None and step >= 0 else None,
            checkpoint_time=_time(body.get("checkpointTime")),
            resumed_from_step=_int(body.get("resumedFromStep")),
            request=_int(body.get("request")),
        )
    return None


def from_gauges(gauges: dict[str, float]) -> Progress | None:
    """Progress from rank 0's metric samples by name; None when it exports none of ours."""
    step = gauges.get("capstan_train_checkpoint_step")
    resumed = gauges.get("capstan_train_resumed_from_step")
    request = gauges.get("capstan_train_checkpoint_request")
    stamp = gauges.get("capstan_train_checkpoint_timestamp_seconds")
    if step is None and resumed is None and request is None:
        return None
    return Progress(
        checkpoint_step=int(step) if step is not None and step >= 0 else None,
        checkpoint_time=_time(stamp),
        resumed_from_step=int(resumed) if resumed is not None else None,
        request=int(request) if request is not None else None,
    )


def request_value(request_id: int, mode: str) -> str:
    """The value of rank 0's :data:`REQUEST_ANNOTATION` (mode: save, stop or cancel)."""
    return f"{request_id}:{mode}"


def parse_request(value: str) -> tuple[int, str] | None:
    """``(id, mode)`` of a :data:`REQUEST_ANNOTATION` value; None when it is not one."""
    head, _, mode = value.strip().partition(":")
    if not head.isdigit() or mode not in ("save", "stop", "cancel"):
        return None
    return int(head), mode
