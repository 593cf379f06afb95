"""The fault tier runs in a pytest session of its own (``make test-faults``; ``make test`` runs it
after the rest of the suite, against the same cluster).

Its operator is a subprocess scoped to one namespace, killed and restarted on purpose. The e2e
suite's operator (``tests/e2e/conftest.py``) watches every namespace and lives until the end of
its session, so in a shared session two operators would reconcile the same TrainingJobs and
the fault runs would measure both. When tests from both folders are selected, the fault tests are
deselected, and the terminal summary says how to run them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_E2E = _HERE.parent / "e2e"
_DESELECTED: list[str] = []


def _under(item: pytest.Item, folder: Path) -> bool:
    return item.path.resolve().is_relative_to(folder)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the fault tests when e2e tests share the session."""
    if not any(_under(item, _E2E) for item in items):
        return
    faults = [item for item in items if _under(item, _HERE)]
    if not faults:
        return
    _DESELECTED[:] = [item.nodeid for item in faults]
    config.hook.pytest_deselected(items=faults)
    items[:] = [item for item in items if not _under(item, _HERE)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say why the fault tests did not run."""
    if _DESELECTED:
        terminalreporter.write_line(
            f"{len(_DESELECTED)} fault test(s) deselected: they need a session without the e2e suite's "
            "operator (make test-faults, or pytest tests/faults)")
