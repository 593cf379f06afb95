"""``capstan run --local``: train every TrainingJob, then serve every ModelServing and query it."""

from __future__ import annotations

import time
from pathlib import Path

from capstan.api.loading import CapstanObject
from capstan.api.modelserving import ModelServing
from capstan.api.trainingjob import TrainingJob
from capstan.local.serving import LocalServer, LocalServingError, start_server
from capstan.local.training import LocalRestoreError, run_trainingjob

EXIT_FAILED = 1


def run_local(
    resources: list[CapstanObject],
    workdir: Path,
    prompts: list[str],
    serve_forever: bool = False,
    timeout_s: float | None = None,
) -> int:
    """Run ``resources`` here; exit code 0 when every job succeeded and every server answered."""
    workdir.mkdir(parents=True, exist_ok=True)
    for job in (r for r in resources if isinstance(r, TrainingJob)):
        try:
            run = run_trainingjob(job, workdir, timeout_s=timeout_s)
        except LocalRestoreError as exc:
            print(f"[capstan] error: {exc}")
            return EXIT_FAILED
        status = run.job.status
        print(f"[capstan] trainingjob/{job.metadata.name} {status.phase}: {status.message}")
        if status.phase != "Succeeded":
            print(f"[capstan] logs: {run.job_dir / 'logs'}")
            return EXIT_FAILED
    servers: list[LocalServer] = []
    try:
        for ms in (r for r in resources if isinstance(r, ModelServing)):
            try:
                server = start_server(ms, workdir)
                servers.append(server)
                where = f"{server.url} (log {server.log_path})"
                print(f"[capstan] modelserving/{ms.metadata.name}: starting {where}")
                server.wait_ready()
            except LocalServingError as exc:
                print(f"[capstan] error: {exc}")
                return EXIT_FAILED
            print(f"[capstan] modelserving/{ms.metadata.name}: Ready at {server.url}/v1/completions")
            for prompt in prompts:
                answer = server.complete(prompt)
                text = answer["choices"][0]["text"]
                print(f"[capstan] completion for {prompt!r}: {text!r}")
        if serve_forever and servers:
            print("[capstan] serving; Ctrl-C to stop")
            while all(s.proc.poll() is None for s in servers):
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        for server in servers:
            server.stop()
    return 0
