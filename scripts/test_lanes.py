#!/usr/bin/env python3
"""Run the test suite in two lanes at once; `make test` calls it inside `scripts/cluster.py run`.

    test_lanes.py --beside tests/e2e --beside tests/faults --beside tests/kube -- PYTEST...

The second lane runs each ``--beside`` folder in a pytest session of its own, one after the other
(the fault tier needs a session apart from the e2e suite's operator, see tests/faults/conftest.py),
and stops at the first that fails, as ``a && b`` would. The first lane runs everything else in
one session. The cluster tiers mostly wait on the API server and the operator while the rest
mostly computes (real training processes, helm), so side by side the suite takes about as long as
the longer lane instead of the sum; which folders go beside balances the two.

The first lane prints as it goes; the second lane's output is kept in a file and printed whole
when both are done, so neither interleaves with the other. Each session gets its own
``--basetemp`` in one temporary folder, removed when every session passed (the exit status is
then 0) and kept for a look otherwise. SIGTERM (CI cancelling the job) or Ctrl-C stops both lanes.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO


class _Lane:
    """pytest sessions run one after the other, stopping at the first that fails."""

    def __init__(self, name: str, sessions: list[list[str]], out: IO[bytes] | None) -> None:
        self.name = name
        self.sessions = sessions
        self.out = out
        self.rc = 0
        self.seconds = 0.0
        self.child: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self._lock = threading.Lock()

    def run(self) -> None:
        """Run the sessions; ``rc`` is the first nonzero exit status, else 0."""
        start = time.monotonic()
        for command in self.sessions:
            with self._lock:
                if self.stopped:
                    self.rc = self.rc or 1
                    break
                err = subprocess.STDOUT if self.out is not None else None
                self.child = subprocess.Popen(command, stdout=self.out, stderr=err)
            rc = self.child.wait()
            if rc:
                self.rc = rc
                break
        self.seconds = time.monotonic() - start

    def stop(self) -> None:
        """Terminate the running session (SIGKILL after 10 s) and start no other."""
        with self._lock:
            self.stopped = True
            child = self.child
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--beside FOLDER``... ``-- PYTEST...``; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beside", action="append", required=True, metavar="FOLDER",
                        help="a test folder for the second lane: a session of its own, in order")
    parser.add_argument("pytest", nargs=argparse.REMAINDER, help="the pytest command line, after --")
    args = parser.parse_args(argv)
    pytest = args.pytest[1:] if args.pytest[:1] == ["--"] else args.pytest
    if not pytest:
        parser.error("give the pytest command after --")
    tiers: list[str] = args.beside
    temp = Path(tempfile.mkdtemp(prefix="capstan-test-lanes-"))
    log_path = temp / "second-lane.log"
    with open(log_path, "wb") as log:
        sessions = [[*pytest, f"--basetemp={temp / f'beside-{i}'}", tier] for i, tier in enumerate(tiers)]
        beside = _Lane("second lane (" + ", ".join(tiers) + ")", sessions, log)
        ignore = [f"--ignore={tier}" for tier in tiers]
        rest = _Lane("first lane (the rest)", [[*pytest, f"--basetemp={temp / 'first'}", *ignore]], None)

        def on_sigterm(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)

        old = signal.signal(signal.SIGTERM, on_sigterm)
        thread = threading.Thread(target=beside.run, name="second-lane", daemon=True)
        try:
            thread.start()
            rest.run()
            thread.join()
        except BaseException:  # SIGTERM or Ctrl-C: both lanes stop
            rest.stop()
            beside.stop()
            thread.join(timeout=15)
            raise
        finally:
            signal.signal(signal.SIGTERM, old)
    sys.stdout.flush()
    print(f"\n===== {beside.name}: output =====", flush=True)
    sys.stdout.buffer.write(log_path.read_bytes())
    sys.stdout.flush()
    for lane in (rest, beside):
        verdict = "passed" if lane.rc == 0 else f"FAILED (exit status {lane.rc})"
        print(f"test lanes: {lane.name} {verdict} in {lane.seconds:.0f}s", flush=True)
    if rest.rc or beside.rc:
        print(f"test lanes: pytest's temporary folders are kept in {temp}", flush=True)
        return rest.rc or beside.rc
    shutil.rmtree(temp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
