"""Reference trainer: a GPT on a generated corpus under torchrun, with DDP or FSDP2.

Run it as ``python -m capstan_workloads.train [flags]``: outside torchrun it launches torchrun
in-process (from the ``PET_*`` environment) and exits with the workers' meaningful exit code;
under torchrun (``torchrun -m capstan_workloads.train``) it is one worker, and so it is under
DeepSpeed's launcher (``deepspeed --module capstan_workloads.train``: RANK, LOCAL_RANK, WORLD_SIZE
and MASTER_ADDR/PORT in the env, ``--local_rank`` on the command line).

Exit codes (``capstan_workloads.exitcodes``): 0 done, 1 failed, 2 bad arguments (never retried),
75 preempted by SIGTERM after checkpointing (restart the gang without counting a failure).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

from .exitcodes import EXIT_FAILED

# torch is imported only once the flags are known to be good: a typo fails in a fraction of a second.

def build_parser() -> argparse.ArgumentParser:
    """Command-line flags; defaults train a ~0.4M-parameter model that CI can afford."""
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m capstan_workloads.train", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--steps", type=int, default=200, help="optimizer steps to train in total (resumes count)")
    a("--batch-size", type=int, default=8, help="sequences per micro-batch per rank")
    a("--seq-len", type=int, default=64, help="tokens per sequence (the model's block size)")
    a("--grad-accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    a("--n-layer", type=int, default=2)
    a("--n-head", type=int, default=4)
    a("--n-embd", type=int, default=128)
    a("--dropout", type=float, default=0.0)
    a("--lr", type=float, default=3e-3, help="peak learning rate (linear warmup, cosine decay to 10%%)")
    a("--warmup", type=int, default=None, help="warmup steps (default: 5%% of --steps)")
    a("--weight-decay", type=float, default=0.1)
    a("--grad-clip", type=float, default=1.0, help="max global gradient norm (0 disables)")
    a("--seed", type=int, default=1337, help="one seed fixes init, data order and dropout")
    a("--strategy", choices=("ddp", "fsdp"), default="ddp")
    a("--corpus", default=None, help="UTF-8 text file to train on (default: a generated corpus)")
    a("--corpus-chars", type=int, default=1_000_000, help="size of the generated corpus")
    a("--checkpoint-dir", default=env("CAPSTAN_CHECKPOINT_DIR", "checkpoints"),
      help="where step-*/ and latest live (env CAPSTAN_CHECKPOINT_DIR)")
    a("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    a("--keep", type=int, default=3, help="newest checkpoints to keep")
    a("--resume", choices=("latest", "none"), default="latest")
    a("--checkpoint-threads", type=int, default=1, help="writer threads per rank")
    a("--no-checksums", action="store_true", help="verify only file sizes when resuming (faster)")
    a("--export-dir", default=env("CAPSTAN_EXPORT_DIR"),
      help="where the final model goes (env CAPSTAN_EXPORT_DIR, default CHECKPOINT_DIR/export)")
    a("--log-every", type=int, default=10, help="steps between progress lines")
    a("--loss-log", default=None, help="JSONL of every step's loss (default CHECKPOINT_DIR/losses.jsonl)")
    a("--metrics-port", type=int, default=int(env("CAPSTAN_METRICS_PORT", "9400")), help="0 disables")
    a("--dist-timeout", type=float, default=600.0, help="seconds before a stuck collective fails")
    a("--hold-seconds", type=float, default=600.0,
      help="after saving for the operator's stop request, how long to wait for the stop before training on")
    # DeepSpeed's launcher passes --local_rank=N to every process; LOCAL_RANK in the env says the same
    a("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    ft = p.add_argument_group("fine-tuning (--task sft)")
    f = ft.add_argument
    f("--task", choices=("pretrain", "sft"), default=env("CAPSTAN_TASK", "pretrain"),
      help="pretrain: a GPT from scratch on the corpus; sft: fine-tune a base export on a generated "
      "instruction task, loss on the responses only")
    f("--base-model", default=env("CAPSTAN_BASE_MODEL"),
      help="sft: the base export to start from (env CAPSTAN_BASE_MODEL, relative there to CHECKPOINT_DIR; "
      "default CHECKPOINT_DIR/export, where checkpoint.restoreFrom a pre-training snapshot puts it); the "
      "run itself keeps its checkpoints, losses and exports under CHECKPOINT_DIR/sft")
    f("--sft-examples", type=int, default=4000, help="training examples of the instruction task")
    f("--heldout-examples", type=int, default=400, help="held-out examples the final loss is measured on")
    f("--lora-rank", type=int, default=int(env("CAPSTAN_LORA_RANK", "0")),
      help="train LoRA adapters of this rank, base frozen (0: full fine-tune)")
    f("--lora-alpha", type=float, default=_float(env("CAPSTAN_LORA_ALPHA")),
      help="LoRA scaling numerator (default: 2 x rank)")
    f("--lora-targets", default=env("CAPSTAN_LORA_TARGETS", "qkv,attn.proj"),
      help="comma-separated linear layers to adapt, PEFT-style suffixes: qkv, attn.proj, fc, mlp.proj, proj")
    f("--adapter-dir", default=None, help="where the LoRA adapter goes (default: CHECKPOINT_DIR/sft/adapter)")
    f("--merge", action="store_true", default=env("CAPSTAN_LORA_MERGE", "0") == "1",
      help="LoRA: also export the merged full model to --export-dir")
    return p


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse and cross-check flags; bad ones exit with EXIT_BAD_ARGS (argparse's own code, 2)."""
    p = build_parser()
    args = p.parse_args(argv)
    positive = (
        "steps", "batch_size", "seq_len", "grad_accum", "n_layer", "n_head", "n_embd", "keep", "log_every"
    )
    for name in positive:
        if getattr(args, name) < (0 if name == "steps" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'steps' else 'positive'}")
    if args.n_embd % args.n_head:
        p.error(f"--n-embd {args.n_embd} is not divisible by --n-head {args.n_head}")
    if args.checkpoint_every < 0 or args.lr <= 0 or not 0 <= args.dropout < 1:
        p.error("need --checkpoint-every >= 0, --lr > 0 and 0 <= --dropout < 1")
    if args.corpus and not Path(args.corpus).is_file():
        p.error(f"--corpus {args.corpus}: no such file")
    args.checkpoint_dir = Path(args.checkpoint_dir)
    args.export_dir = Path(args.export_dir) if args.export_dir else args.checkpoint_dir / "export"
    args.loss_log = Path(args.loss_log) if args.loss_log else args.checkpoint_dir / "losses.jsonl"
    if args.task == "sft":
        _finetune_args(p, args)
    elif args.lora_rank or args.merge:
        p.error("--lora-rank and --merge need --task sft")
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)
    return args


#: The GPT's linear layers in every block (capstan_workloads.model): what LoRA can adapt.
GPT_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def _selects_a_linear(target: str) -> bool:
    """PEFT's suffix rule against block 0's linears (a full name of another block counts as block 0)."""
    target = re.sub(r"^blocks\.\d+\.", "blocks.0.", target)
    return any(n == target or n.endswith("." + target) for n in (f"blocks.0.{x}" for x in GPT_LINEARS))


def _finetune_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the sft flags and move the run's files under CHECKPOINT_DIR/sft."""
    if not args.base_model:
        args.base_model = args.checkpoint_dir / "export"
    elif args.base_model == os.environ.get("CAPSTAN_BASE_MODEL"):  # the operator's: under the checkpoints
        args.base_model = args.checkpoint_dir / args.base_model  # (an absolute path stays as it is)
    args.base_model = Path(args.base_model)
    if not (args.base_model / "model.safetensors").is_file():
        p.error(f"--base-model {args.base_model}: no model.safetensors there "
                "(an export of a pre-training run)")
    if args.lora_rank < 0:
        p.error(f"--lora-rank must be >= 0 (0: full fine-tune), got {args.lora_rank}")
    if args.sft_examples < 1 or args.heldout_examples < 1:
        p.error("--sft-examples and --heldout-examples must be positive")
    args.lora_targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    if args.lora_rank and not args.lora_targets:
        p.error("--lora-targets: name at least one layer")
    unknown = [t for t in args.lora_targets if not _selects_a_linear(t)]
    if args.lora_rank and unknown:
        p.error(f"--lora-targets: {', '.join(unknown)} matches no linear layer of the GPT; choose from "
                "qkv, attn.proj, fc, mlp.proj, proj (or full names such as blocks.0.attn.qkv)")
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * max(1, args.lora_rank)
    if args.lora_alpha <= 0:
        p.error(f"--lora-alpha must be > 0, got {args.lora_alpha}")
    if args.merge and not args.lora_rank:
        p.error("--merge needs --lora-rank (a full fine-tune exports the full model anyway)")
    root = args.checkpoint_dir / "sft"
    if args.export_dir == args.checkpoint_dir / "export":  # the default: keep the base's export intact
        args.export_dir = root / "export"
    if args.loss_log == args.checkpoint_dir / "losses.jsonl":
        args.loss_log = root / "losses.jsonl"
    args.adapter_dir = Path(args.adapter_dir) if args.adapter_dir else root / "adapter"
    args.checkpoint_dir = root


def _under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def main(argv: list[str] | None = None) -> int:
    """Entry point: a worker under torchrun, else an exit-code-preserving torchrun launcher."""
    if not _under_torchrun():
        parse_args(argv)  # fail fast (exit 2) before starting any worker
        from .launch import launch

        return launch("capstan_workloads.train", sys.argv[1:] if argv is None else argv)
    from .trainer import worker_main

    try:
        return worker_main(parse_args(argv))
    except SystemExit:
        raise
    except BaseException:
        traceback.print_exc()
        if os.environ.get("RANK") == "0":  # the last line of the log tail the operator reads
            from .trainer import PROGRESS

            print(PROGRESS.line())
        sys.stdout.flush()
        sys.stderr.flush()
        # os._exit: a checkpoint thread blocked in a collective with a dead peer would otherwise
        # keep the interpreter alive at exit; the gang is restarted from the last checkpoint anyway.
        os._exit(EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
