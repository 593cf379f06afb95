"""Worker processes that stand in for pods, and the pod dicts the planner observes from them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# Variables that name cluster addresses or mount paths; the local executor points them at this machine.
_ADDR_VARS = ("MASTER_ADDR", "PET_MASTER_ADDR")
_PORT_VARS = ("MASTER_PORT", "PET_MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(pod: dict[str, Any], overrides: dict[str, str]) -> dict[str, str]:
    """The pod's container environment, with cluster addresses replaced by local ones."""
    env = dict(os.environ)
    # Keep our own interpreter's tools (torchrun, python) first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for var in pod["spec"]["containers"][0].get("env", []):
        env[var["name"]] = var.get("value", "")
    env.update(overrides)
    return env


#: A kubelet variable reference in command or args: ``$(NAME)``, or ``$$(NAME)`` for a literal one.
_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: dict[str, str]) -> str:
    """``text`` with ``$(NAME)`` replaced by ``env[NAME]`` as the kubelet does: ``$$`` is a literal
    ``$`` and a reference to an undefined name is left as it is."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


def resolve_command(pod: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    """Command line of the pod's container (command + args) with ``$(VAR)`` references expanded
    from ``env`` (the container's), the executable found on PATH."""
    c = pod["spec"]["containers"][0]
    argv = [*(c.get("command") or []), *(c.get("args") or [])]
    if env is not None:
        argv = [expand_vars(a, env) for a in argv]
    if not argv:
        raise ValueError("the local executor needs spec.command (it cannot read an image's entrypoint)")
    exe = shutil.which(argv[0], path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if exe is None:
        hint = " (launcher deepspeed: pip install deepspeed)" if argv[0] == "deepspeed" else ""
        raise FileNotFoundError(f"spec.command[0] {argv[0]!r} is not on PATH{hint}")
    return [exe, *argv[1:]]


@dataclass
class Worker:
    """A running (or finished) worker process and what the planner needs to know of it."""

    pod: dict[str, Any]
    proc: subprocess.Popen[bytes]
    log_path: Path
    deleting: bool = False
    pump: threading.Thread | None = field(default=None, repr=False)
    termination_log: Path | None = None  # the container's /dev/termination-log stand-in

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    def _termination_message(self) -> str:
        return _termination_message_of(self.termination_log)

    def observed(self) -> dict[str, Any]:
        """The pod as the API server would report it (phase, exit code, deletionTimestamp)."""
        code = self.proc.poll()
        status: dict[str, Any] = {"phase": "Running"}
        if code is not None:
            # A negative code means "killed by signal N": report it as 128+N like a container runtime.
            exit_code = code if code >= 0 else 128 - code
            terminated: dict[str, Any] = {"exitCode": exit_code}
            message = self._termination_message()
            if message:
                terminated["message"] = message
            status = {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [{"name": "worker", "state": {"terminated": terminated}}],
            }
        meta = dict(self.pod["metadata"])
        if self.deleting:
            meta["deletionTimestamp"] = "now"
        return {"metadata": meta, "spec": self.pod["spec"], "status": status}


def _termination_message_of(path: Path | None) -> str:
    """The termination message the process left (the kubelet reads at most 4096 bytes)."""
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[:4096]
    except OSError:
        return ""


def write_annotations(path: Path, annotations: dict[str, str]) -> None:
    """Write ``annotations`` as the kubelet's downward API does (``key="value"`` lines), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{k}={json.dumps(v)}\n" for k, v in sorted(annotations.items())))
    os.replace(tmp, path)


def _pump(stream: IO[bytes], log: IO[bytes], echo: Callable[[str], None] | None) -> None:
    for line in iter(stream.readline, b""):
        log.write(line)
        log.flush()
        if echo is not None:
            echo(line.decode(errors="replace").rstrip("\n"))
    stream.close()
    log.close()


def start_worker(
    pod: dict[str, Any],
    overrides: dict[str, str],
    log_path: Path,
    echo: Callable[[str], None] | None = None,
) -> Worker:
    """Start the pod's container command as a process; its output goes to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = local_env(pod, overrides)
    proc = subprocess.Popen(
        resolve_command(pod, env),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # so a gang restart can signal torchrun and all its children
    )
    assert proc.stdout is not None
    pump = threading.Thread(target=_pump, args=(proc.stdout, log_path.open("ab"), echo), daemon=True)
    pump.start()
    return Worker(pod=pod, proc=proc, log_path=log_path, pump=pump)


def descendants(pid: int) -> list[int]:
    """PIDs of every live descendant of ``pid`` (Linux ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after it.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def signal_group(worker: Worker, sig: int, tree: Iterable[int] = ()) -> None:
    """Send ``sig`` to the worker's process group and to the groups of ``tree``: torchrun starts each
    rank in a session of its own, out of reach of a signal to torchrun's group."""
    for pid in dict.fromkeys((worker.proc.pid, *tree)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:  # not a group leader (or gone): the process alone
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        except PermissionError:
            pass


def stop_worker(worker: Worker, grace_s: float) -> None:
    """SIGTERM the worker and everything it started (the trainer checkpoints on it), SIGKILL after
    ``grace_s``: a pod's containers all die with it."""
    # Read the tree first: once torchrun is gone its ranks belong to init and cannot be found.
    tree = descendants(worker.proc.pid)
    if worker.proc.poll() is None:
        signal_group(worker, signal.SIGTERM, tree)
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=grace_s)
    signal_group(worker, signal.SIGKILL, [*tree, *(d for pid in tree for d in descendants(pid))])
    if worker.proc.poll() is None:
        worker.proc.wait()
    if worker.pump is not None:
        worker.pump.join(timeout=5)
