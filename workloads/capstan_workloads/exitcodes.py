"""Process exit codes of the reference workloads; the operator's failure policy relies on these numbers."""

from __future__ import annotations

#: Finished: trained, checkpointed and exported.
EXIT_OK = 0
#: Unexpected error: the gang is restarted and the restart counts against ``maxRestarts``.
EXIT_FAILED = 1
#: Bad flags or configuration: retrying cannot help, so it is never restarted (argparse also exits 2).
EXIT_BAD_ARGS = 2
#: Preempted (SIGTERM): the current step finished and a checkpoint was written.
#: Restart the gang without counting a failure. Equals ``EX_TEMPFAIL`` from sysexits.h.
EXIT_PREEMPTED = 75
