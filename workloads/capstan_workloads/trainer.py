"""The training loop of one torchrun worker (see :mod:`capstan_workloads.train` for the entry point)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from .checkpoint import CheckpointManager, RNGState, TrainState, rng_key, step_dir_name
from .data import DataStream, TokenWindows, load_corpus
from .distributed import (
    DistEnv,
    agree_step,
    broadcast_object,
    grad_sync,
    init_distributed,
    unwrap,
    wrap_model,
)
from .exitcodes import EXIT_OK, EXIT_PREEMPTED
from .export import full_state_dict, write_export
from .finetune import EVAL_FILE, FineTune, export, optimizer_state_bytes, prepare, write_eval
from .lora import count_params
from .metrics import TrainMetrics
from .model import GPT, GPTConfig
from .progress import Progress, RequestWatcher, parse_request
from .sft import heldout_loss
from .tokenizer import Tokenizer

log = logging.getLogger("capstan.train")

#: Rank 0's progress in this process (the crash path of ``train.main`` prints it last).
PROGRESS = Progress()
HOLD_POLL_S = 0.5


def setup_logging(rank: int, who: str | None = None) -> None:
    """Progress to stdout on rank 0; only warnings and errors from the other ranks."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[{who or f'rank{rank}'}] %(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def lr_lambda(warmup: int, total: int) -> Any:
    """Linear warmup to 1, then cosine decay to 0.1 at ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class Preemption:
    """Remembers a SIGTERM; the loop finishes its step, checkpoints and exits EXIT_PREEMPTED."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:  # torchrun may forward the signal more than once
            log.warning("SIGTERM: finishing this step, then checkpointing and exiting %d", EXIT_PREEMPTED)
        self.requested = True


def hold_for_stop(
    request: int, watcher: RequestWatcher, preemption: Preemption, env: DistEnv, hold_s: float
) -> bool:
    """After saving for stop request ``request``: take no more steps until SIGTERM (True) or until
    the request is called off or ``hold_s`` passes (False: training goes on). Every rank loops
    here together, so no rank waits alone in a collective."""
    deadline = time.monotonic() + hold_s
    while True:
        resume = 0.0
        if env.is_main:
            off = parse_request(watcher.value(force=True)) != (request, "stop")
            resume = float(off or time.monotonic() > deadline)
        term, _, resumed = agree_step(preemption.requested, 0.0, resume, env.device)
        if term:
            return True
        if resumed > 0:
            log.warning("stop request %d called off (or held %.0fs): training goes on", request, hold_s)
            return False
        time.sleep(HOLD_POLL_S)


def train(args: argparse.Namespace, env: DistEnv) -> int:
    """The training loop of one worker; returns its exit code."""
    preemption = Preemption()
    restart = os.environ.get("CAPSTAN_RESTART_COUNT", "0")

    ft: FineTune | None = None
    dataset: Dataset[tuple[torch.Tensor, torch.Tensor]]
    if args.task == "sft":
        ft = prepare(args, env.device)  # the same base and examples on every rank
        gpt, tokenizer, dataset = ft.model, ft.tokenizer, ft.train
        tokens_per_sample = gpt.cfg.block_size
    else:
        # Same corpus and tokenizer on every rank: both are pure functions of the flags.
        text = load_corpus(args.corpus, args.corpus_chars)
        tokenizer = Tokenizer.build([text])
        dataset = TokenWindows.from_text(text, tokenizer, args.seq_len)
        cfg = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=args.seq_len, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd, dropout=args.dropout)
        torch.manual_seed(args.seed)  # identical init on every rank, and across runs
        with torch.device(env.device):
            gpt = GPT(cfg)
        tokens_per_sample = args.seq_len
    stream = DataStream(dataset, args.batch_size, env.rank, env.world_size, args.seed)
    cfg = gpt.cfg
    torch.manual_seed(args.seed + 1 + env.rank)  # per-rank streams for dropout
    model = wrap_model(gpt, args.strategy, env)
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.steps))
    app = TrainState(model, optimizer, scheduler, stream, base=ft.base_fingerprint if ft else None,
                     trainable_only=bool(ft and ft.lora))
    state: dict[str, Any] = {"app": app, rng_key(env.rank): RNGState()}

    metrics = TrainMetrics()
    if env.is_main:
        args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        log.info("model: %s parameters (%s), world size %d on %s, strategy %s, restart %s",
                 f"{gpt.num_params():,}", json.dumps(vars(cfg)), env.world_size, env.device.type,
                 args.strategy, restart)
        if ft is not None:
            n_train, n_total = count_params(gpt)
            log.info("sft from %s (%s): %s of %s parameters trainable%s", ft.base, ft.base_fingerprint,
                     f"{n_train:,}", f"{n_total:,}",
                     f", LoRA rank {args.lora_rank} alpha {args.lora_alpha:g} on {len(ft.targets)} layers "
                     f"({', '.join(ft.targets)})" if ft.lora else " (full fine-tune)")

    progress = PROGRESS

    def on_commit(step: int, seconds: float) -> None:
        metrics.committed(step, seconds)
        progress.checkpoint_step, progress.checkpoint_time = step, time.time()
        log.info("checkpoint %s committed (%.2fs after it started)", step_dir_name(step), seconds)

    ckpt = CheckpointManager(args.checkpoint_dir, args.keep, env.rank, io_threads=args.checkpoint_threads,
                             checksums=not args.no_checksums, on_commit=on_commit)
    resume_from = None
    if args.resume == "latest":
        found = ckpt.find_resumable() if env.is_main else None
        resume_from = broadcast_object(str(found) if found else None)
        if resume_from:
            ckpt.load(Path(str(resume_from)), state)
            log.info("resumed from %s (step %d)", Path(str(resume_from)).name, app.step)
            progress.resumed_from_step = progress.checkpoint_step = app.step
            progress.checkpoint_time = Path(str(resume_from)).stat().st_mtime
            metrics.resumed_from_step.set(app.step)
            metrics.checkpoint_step.set(app.step)
            metrics.checkpoint_timestamp.set(progress.checkpoint_time)
    # Only rank 0 reads requests; agree_step hands them to every rank at the same step.
    watcher = RequestWatcher.from_env() if env.is_main else RequestWatcher(None)
    if env.is_main:
        metrics.serve(args.metrics_port)

    loss_log: TextIO | None = args.loss_log.open("a") if env.is_main else None
    tokens_per_step = args.batch_size * tokens_per_sample * args.grad_accum * env.world_size
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda"
                else contextlib.nullcontext())
    last_saved = app.step if resume_from else None
    stopped = False
    model.train()
    while app.step < args.steps:
        t0 = time.perf_counter()
        losses = []
        for micro in range(args.grad_accum):
            x, y = stream.next_batch()
            x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
            with grad_sync(model, micro == args.grad_accum - 1), autocast:
                _, loss = model(x, y)
                assert loss is not None
                (loss / args.grad_accum).backward()
            losses.append(loss.detach())
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        app.step += 1
        loss_sum = torch.stack(losses).float().mean().item()
        # Every rank must stop at the same step, or the survivors would hang in the next collective.
        asked = 0.0
        pending = watcher.pending(progress.request) if env.is_main else None
        if pending is not None:
            asked = float(pending[0] * 2 + pending[1])
        stopped, loss_mean, asked = agree_step(preemption.requested, loss_sum, asked, env.device)
        request, stop_request = divmod(round(asked), 2)
        dt = time.perf_counter() - t0
        if env.is_main:
            metrics.step.set(app.step)
            metrics.loss.set(loss_mean)
            metrics.tokens.inc(tokens_per_step)
            metrics.tokens_per_second.set(tokens_per_step / dt)
            metrics.step_seconds.observe(dt)
            assert loss_log is not None
            record = {"step": app.step, "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                      "tokens_per_s": round(tokens_per_step / dt), "restart": restart}
            loss_log.write(json.dumps(record) + "\n")
            loss_log.flush()
            if app.step % args.log_every == 0 or app.step in (1, args.steps):
                log.info("step %d/%d | loss %.4f | %s tok/s | %.1f ms/step | lr %.2e", app.step, args.steps,
                         loss_mean, f"{tokens_per_step / dt:,.0f}", dt * 1e3, scheduler.get_last_lr()[0])
        periodic = args.checkpoint_every and app.step % args.checkpoint_every == 0
        if (stopped or periodic or request or app.step == args.steps) and last_saved != app.step:
            stall = ckpt.save(app.step, state)
            last_saved = app.step
            metrics.checkpoint_stall_seconds.observe(stall)
            log.info("checkpoint %s started; training stalled %.3fs", step_dir_name(app.step), stall)
        if request and not stopped:
            ckpt.wait()  # on rank 0 this returns once the checkpoint is committed
            if env.is_main and ckpt.last_committed == app.step:
                progress.request = request
                metrics.checkpoint_request.set(request)
                log.info("checkpoint request %d: %s committed%s", request, step_dir_name(app.step),
                         "; holding until stopped" if stop_request else "")
            elif env.is_main:  # not answered: the operator's wait runs out and it stops the gang anyway
                log.warning("checkpoint request %d: the save of step %d failed", request, app.step)
            if stop_request:
                stopped = hold_for_stop(request, watcher, preemption, env, args.hold_seconds)
        if stopped:
            break

    if last_saved != app.step:  # e.g. resumed at the end
        ckpt.save(app.step, state)
    ckpt.close()
    if loss_log is not None:
        loss_log.close()
    if env.is_main:  # a clean exit: rank 0 reports its progress in the termination message
        progress.write_termination_message()
        print(progress.line(), flush=True)
    if stopped:
        if env.is_main:
            log.warning("preempted after step %d: checkpoint %s is committed; exiting %d (restart without "
                        "counting a failure)", app.step, step_dir_name(app.step), EXIT_PREEMPTED)
        return EXIT_PREEMPTED

    if ft is not None:
        return _finish_finetune(ft, model, optimizer, args, env, app.step)
    weights = full_state_dict(model)  # a collective under FSDP: every rank takes part
    if env.is_main:
        write_export(weights, unwrap(model).cfg, tokenizer, args.export_dir)
        log.info("done: %d steps; exported model to %s (model.safetensors, config.json, tokenizer.json)",
                 app.step, args.export_dir.resolve())
    return EXIT_OK


def _finish_finetune(
    ft: FineTune, model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
    env: DistEnv, step: int,
) -> int:
    """Held-out loss (every rank evaluates: a collective under FSDP), then rank 0 exports."""
    loss = heldout_loss(unwrap(model), ft.heldout, env.device)
    weights = full_state_dict(model)
    if env.is_main:
        n_train, n_total = count_params(ft.model)
        record = {"method": "lora" if ft.lora else "full", "steps": step, "heldout_loss": loss,
                  "heldout_examples": len(ft.heldout), "trainable_params": n_train, "total_params": n_total,
                  "optimizer_state_bytes": optimizer_state_bytes(optimizer), "base": str(ft.base),
                  "base_fingerprint": ft.base_fingerprint, "lora_targets": ft.targets}
        write_eval(args.checkpoint_dir / EVAL_FILE, record)
        written = export(ft, weights, args)
        log.info("held-out loss %.4f over %d examples", loss, len(ft.heldout))
        log.info("done: %d steps; exported %s", step, ", ".join(str(p.resolve()) for p in written))
    return EXIT_OK


def worker_main(args: argparse.Namespace) -> int:
    """One torchrun worker: join the gang, train, leave."""
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    env = init_distributed(args.dist_timeout)
    code = train(args, env)
    dist.barrier()
    dist.destroy_process_group()
    return code


