"""Run torchrun in-process so the trainer's exit code reaches the container runtime.

Plain ``torchrun`` exits 1 whenever a worker fails or torchrun itself gets SIGTERM, which hides
``EXIT_PREEMPTED`` (75) and ``EXIT_BAD_ARGS`` (2) from the operator. ``python -m
capstan_workloads.train`` outside torchrun comes here: the same launcher (torchrun reads its flags
from the ``PET_*`` environment the operator injects), the same workers, but a meaningful exit code.
"""

from __future__ import annotations

import logging
import os
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args as torchrun_parse_args
from torch.distributed.run import run as torchrun_run

from .exitcodes import EXIT_BAD_ARGS, EXIT_FAILED, EXIT_OK, EXIT_PREEMPTED

log = logging.getLogger("capstan.train")


def exit_code_of(worker_codes: list[int]) -> int:
    """The launcher's exit code from its failed workers' exit codes.

    Bad arguments win (retrying cannot help); a gang in which every failed worker was preempted
    is preempted; anything else is an ordinary failure.
    """
    if EXIT_BAD_ARGS in worker_codes:
        return EXIT_BAD_ARGS
    if worker_codes and all(c == EXIT_PREEMPTED for c in worker_codes):
        return EXIT_PREEMPTED
    return EXIT_FAILED if worker_codes else EXIT_OK


def launch(module: str, argv: list[str]) -> int:
    """Start ``python -m module *argv`` as this node's torchrun workers; return the exit code."""
    logging.basicConfig(level=logging.INFO, format="[launcher] %(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    flags: list[str] = []
    if "PET_MASTER_ADDR" not in os.environ and "PET_RDZV_ENDPOINT" not in os.environ:
        flags.append("--standalone")  # a single machine with no rendezvous given: a local gang
    args = torchrun_parse_args([*flags, "-m", module, *argv])
    try:
        torchrun_run(args)
    except ChildFailedError as e:
        return exit_code_of([f.exitcode for f in e.failures.values()])
    except SignalException as e:
        # torchrun forwarded the signal and gave the workers its shutdown timeout to checkpoint.
        log.warning("launcher got signal %s: workers were asked to checkpoint and stop", e.sigval)
        return EXIT_PREEMPTED
    finally:
        sys.stdout.flush()
    return EXIT_OK
