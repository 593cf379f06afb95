"""``python -m capstan_workloads.serve --model-dir DIR --port 8000``: serve until SIGTERM, then drain."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys

from aiohttp import web

from .app import DEVICE_ENV, DTYPES, QUANTIZATIONS, STATE, Limits, create_app

log = logging.getLogger("capstan_workloads.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; every limit of :class:`Limits` has one."""
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m capstan_workloads.serve", description=__doc__)
    p.add_argument(
        "--model-dir", required=True, help="exported model: model.safetensors, config.json, tokenizer.json"
    )
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="sequences decoded per step")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting, help="queued requests before 429")
    p.add_argument(
        "--kv-blocks",
        type=int,
        default=None,
        help="KV-cache pool size in blocks (default: max-batch-size full-length sequences)",
    )
    p.add_argument("--kv-block-tokens", type=int, default=d.kv_block_tokens, help="tokens per KV block")
    p.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=d.max_prefill_tokens,
        help="prompt tokens prefilled per scheduler step",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: available CPUs)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=d.drain_seconds,
        help="on SIGTERM, wait this long for in-flight requests",
    )
    p.add_argument("--retry-after-seconds", type=int, default=d.retry_after_seconds)
    p.add_argument("--add-bos", action="store_true", help="prepend <bos> to every prompt")
    p.add_argument("--model-name", default=None, help="model name in responses (default: model dir name)")
    p.add_argument(
        "--device",
        default=os.environ.get(DEVICE_ENV, d.device),
        help="auto (a CUDA GPU when torch sees one, else CPU), cpu, cuda or cuda:N "
        f"(default: ${DEVICE_ENV}, else auto)",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=d.prefix_caching,
        help="reuse the KV blocks of prompt prefixes seen before (default: on)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        help="jinja2 chat template file for /v1/chat/completions "
        "(default: the model dir's chat_template.jinja, else a plain 'role: content' template)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=d.quantization,
        help="int8: weight-only int8 linear layers with per-output-channel scales; embeddings and "
        "norms stay in --dtype (default: none)",
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve LoRA adapters over the base model (load them with POST /v1/load_lora_adapter)",
    )
    p.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="LoRA adapters (PEFT format) to serve from the start, requested by model name; "
        "implies --enable-lora",
    )
    p.add_argument("--max-loras", type=int, default=d.max_loras, help="adapters served at once")
    p.add_argument("--max-lora-rank", type=int, default=d.max_lora_rank, help="largest adapter rank accepted")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM/SIGINT (drain, exit 0) or a failed model load (exit 1)."""
    app = create_app(
        args.model_dir,
        max_batch_size=args.max_batch_size,
        max_waiting=args.max_waiting,
        kv_blocks=args.kv_blocks,
        kv_block_tokens=args.kv_block_tokens,
        max_prefill_tokens=args.max_prefill_tokens,
        threads=args.threads,
        dtype=args.dtype,
        drain_seconds=args.drain_seconds,
        retry_after_seconds=args.retry_after_seconds,
        add_bos=args.add_bos,
        model_name=args.model_name,
        device=args.device,
        prefix_caching=args.prefix_caching,
        chat_template=args.chat_template,
        quantization=args.quantization,
        enable_lora=args.enable_lora,
        lora_modules=tuple(args.lora_modules),
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
    )
    state = app[STATE]
    # handler_cancellation: a client that hangs up cancels its handler, which frees its KV blocks.
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=5.0
    )
    await runner.setup()  # fires on_startup: model loading starts in the background
    await web.TCPSite(runner, args.host, args.port).start()
    log.info("listening on %s:%d", args.host, args.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert state.load_task is not None
    stop_wait = asyncio.create_task(stop.wait())
    await asyncio.wait({stop_wait, state.load_task}, return_when=asyncio.FIRST_COMPLETED)
    if state.load_task.done() and state.load_error:
        stop_wait.cancel()
        await runner.cleanup()
        print(f"error: cannot serve {args.model_dir}: {state.load_error}", file=sys.stderr)
        return 1
    await stop_wait
    drained = await state.drain(args.drain_seconds)
    log.info("drain %s; shutting down", "complete" if drained else f"timed out after {args.drain_seconds}s")
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return asyncio.run(serve(args))
    except ValueError as exc:  # bad limits
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
