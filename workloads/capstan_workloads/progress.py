"""Rank 0's checkpoint progress for the operator, and the operator's requests to save now.

Reports (read by ``capstan.training.progress`` in the operator): the metrics gauges, and a
``capstan-progress {json}`` line written to the termination message (``/dev/termination-log``,
env ``CAPSTAN_TERMINATION_LOG``) on a clean exit and printed last on any exit (with
``terminationMessagePolicy: FallbackToLogsOnError`` a crash's log tail carries it).

Requests: the operator annotates rank 0's pod ``capstan.dev/checkpoint-request: "<id>:<mode>"``
(save, stop or cancel); the kubelet writes the pod's annotations to a downward-API file (env
``CAPSTAN_PODINFO_ANNOTATIONS``) in the ``key="value"`` form, one per line.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("capstan.train")

PROGRESS_PREFIX = "capstan-progress "
REQUEST_ANNOTATION = "capstan.dev/checkpoint-request"
TERMINATION_LOG = "/dev/termination-log"


@dataclass
class Progress:
    """What rank 0 reports: newest committed checkpoint, where this gang resumed, requests answered."""

    checkpoint_step: int | None = None
    checkpoint_time: float | None = None  # unix seconds of the commit
    resumed_from_step: int = -1  # -1: a fresh start
    request: int = 0  # last request answered (0: none)

    def line(self) -> str:
        """The ``capstan-progress`` line the operator parses."""
        body: dict[str, object] = {"resumedFromStep": self.resumed_from_step, "request": self.request}
        if self.checkpoint_step is not None:
            body["checkpointStep"] = self.checkpoint_step
        if self.checkpoint_time is not None:
            when = datetime.fromtimestamp(self.checkpoint_time, UTC)
            body["checkpointTime"] = when.strftime("%Y-%m-%dT%H:%M:%SZ")
        return PROGRESS_PREFIX + json.dumps(body, sort_keys=True)

    def write_termination_message(self) -> None:
        """Write :meth:`line` to the termination message file, when there is one to write."""
        path = Path(os.environ.get("CAPSTAN_TERMINATION_LOG", TERMINATION_LOG))
        if not path.parent.is_dir():
            return
        try:
            path.write_text(self.line() + "\n")
        except OSError as e:  # outside a container /dev/termination-log is not ours to write
            log.debug("no termination message (%s)", e)


def parse_annotations(text: str) -> dict[str, str]:
    """A downward-API annotations file (``key="value"`` lines, Go-quoted values) as a dict."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, raw = line.partition("=")
        if not sep:
            continue
        try:
            value = json.loads(raw)  # Go's %q of printable text is a JSON string
        except ValueError:
            value = raw.strip('"')
        out[key.strip()] = str(value)
    return out


def parse_request(value: str) -> tuple[int, str] | None:
    """``(id, mode)`` of a request annotation value ``<id>:<mode>``; None when it is not one."""
    head, _, mode = value.strip().partition(":")
    if not head.isdigit() or mode not in ("save", "stop", "cancel"):
        return None
    return int(head), mode


class RequestWatcher:
    """Reads the request annotation from the downward-API file, at most every ``interval`` seconds."""

    def __init__(self, path: Path | None, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._last_read = float("-inf")
        self._value = ""

    @classmethod
    def from_env(cls) -> RequestWatcher:
        """The watcher of ``CAPSTAN_PODINFO_ANNOTATIONS`` (none when unset: requests are never seen)."""
        path = os.environ.get("CAPSTAN_PODINFO_ANNOTATIONS")
        return cls(Path(path) if path else None)

    def value(self, force: bool = False) -> str:
        """The annotation's current value ("" when absent or unreadable)."""
        now = time.monotonic()
        if self.path is None or (not force and now - self._last_read < self.interval):
            return self._value
        self._last_read = now
        try:
            self._value = parse_annotations(self.path.read_text()).get(REQUEST_ANNOTATION, "")
        except OSError:
            self._value = ""
        return self._value

    def pending(self, answered: int) -> tuple[int, bool] | None:
        """``(id, stop)`` of a save or stop request newer than ``answered``; None when there is none."""
        parsed = parse_request(self.value())
        if parsed is None or parsed[0] <= answered or parsed[1] == "cancel":
            return None
        return parsed[0], parsed[1] == "stop"
