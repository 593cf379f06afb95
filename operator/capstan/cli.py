"""The ``capstan`` command line: crds, render, run --local, operator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capstan.api.loading import InvalidDocuments, InvalidObject, load_objects
from capstan.config import ConfigError

EXIT_INVALID = 2


def _cmd_crds(args: argparse.Namespace) -> int:
    from capstan.api.crdgen import stale_crds, write_crds

    out = Path(args.out)
    if args.check:
        stale = stale_crds(out)
        if stale:
            print(
                f"stale CRDs in {out}/: {', '.join(stale)}; regenerate with `make crds` "
                f"(or `capstan crds --out {out}`)",
                file=sys.stderr,
            )
            return 1
        print(f"CRDs in {out}/ are up to date")
        return 0
    for path in write_crds(out):
        print(f"wrote {path}")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from capstan.config import OperatorConfig
    from capstan.render import render, to_yaml

    resources = [r for f in args.file for r in load_objects(f)]
    if args.namespace:
        # Like `kubectl apply -n`: the namespace of resources whose file names none.
        update = {"namespace": args.namespace}
        resources = [
            r
            if "namespace" in r.metadata.model_fields_set
            else r.model_copy(update={"metadata": r.metadata.model_copy(update=update)})
            for r in resources
        ]
    # The operator's own environment variables, as the operator would read them.
    sys.stdout.write(to_yaml(render(resources, OperatorConfig.from_env())))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.local:
        print("only --local is supported: in a cluster, `kubectl apply -f` the file instead", file=sys.stderr)
        return EXIT_INVALID
    from capstan.local.session import run_local

    return run_local(
        [r for f in args.file for r in load_objects(f)],
        workdir=Path(args.workdir),
        prompts=args.prompt or [],
        serve_forever=args.serve,
        timeout_s=args.timeout,
    )


def _cmd_operator(args: argparse.Namespace) -> int:
    from capstan.kube.operator import run_operator

    run_operator(
        namespaces=args.namespace or [],
        clusterwide=args.all_namespaces,
        peering=args.peering,
        standalone=args.standalone,
        metrics_port=args.metrics_port,
        liveness_port=args.liveness_port,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="capstan", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    crds = sub.add_parser("crds", help="write the CRDs generated from the API models")
    crds.add_argument("--out", default="crds", help="directory to write into (default: crds)")
    crds.add_argument("--check", action="store_true", help="exit 1 if the files there are stale")
    crds.set_defaults(fn=_cmd_crds)

    render = sub.add_parser("render", help="print every object the operator would create, as YAML")
    render.add_argument(
        "-f",
        "--file",
        required=True,
        action="append",
        help="YAML file of TrainingJobs/ModelServings ('-': stdin)",
    )
    render.add_argument(
        "-n", "--namespace", help="namespace of the resources whose file names none (default: default)"
    )
    render.set_defaults(fn=_cmd_render)

    run = sub.add_parser("run", help="run resources on the local executor")
    run.add_argument("-f", "--file", required=True, action="append", help="YAML file (repeatable)")
    run.add_argument("--local", action="store_true", help="run here, as processes (the embedded default)")
    run.add_argument("--workdir", default=".capstan", help="checkpoints, logs and snapshots go here")
    run.add_argument("--prompt", action="append", help="send this completion request to each ModelServing")
    run.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C after the prompts")
    run.add_argument(
        "--timeout", type=float, default=None, help="give up on a TrainingJob after this many seconds"
    )
    run.set_defaults(fn=_cmd_run)

    op = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    op.add_argument("--namespace", action="append", help="watch this namespace (repeatable)")
    op.add_argument("--all-namespaces", action="store_true", help="watch the whole cluster")
    op.add_argument("--peering", default=None, help="kopf peering object name for leader election")
    op.add_argument("--standalone", action="store_true", help="no peering (a single replica)")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus metrics port")
    op.add_argument("--liveness-port", type=int, default=8080, help="liveness endpoint port (/healthz)")
    op.set_defaults(fn=_cmd_operator)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``capstan`` script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except InvalidObject as exc:
        for problem in exc.problems if isinstance(exc, InvalidDocuments) else [exc]:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_INVALID
    except ConfigError as exc:  # `capstan render` previews with the operator's environment
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except OSError as exc:  # e.g. the output pipe closed; input files are read by the loader
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID


if __name__ == "__main__":
    sys.exit(main())
