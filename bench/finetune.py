"""Fine-tuning yardstick: LoRA against full fine-tuning of the same base, side by side in one run.

One base is pre-trained, then fine-tuned twice on the same generated instruction task
(:mod:`capstan_workloads.sft`) for the same number of steps and batches: a full fine-tune and a
LoRA run. Each run is the real trainer (``python -m capstan_workloads.train --task sft``); the
figures come from the ``eval.json`` each writes:

* ``trainable_params`` and ``optimizer_state_bytes`` (AdamW's moments on the trainable values);
* ``heldout_loss``: mean cross-entropy per response token on held-out examples;
* ``base_heldout_loss``: the same for the base model before fine-tuning.

The claim checked: LoRA reaches the full fine-tune's held-out loss within ``--margin`` of the full
fine-tune's improvement over the base, i.e. ``lora <= full + margin * (base - full)`` (0.05: LoRA
achieves at least 95% of the loss reduction full fine-tuning achieves). A relative margin on the
final losses alone would be meaningless here: both runs end far below the base's loss, near zero.
Each method gets its usual learning rate (LoRA trains far fewer values and takes a larger one).
Wall times are indicative only (the machine may be shared).

Usage: ``python bench/finetune.py [--json] [--steps 300] [--margin 0.05]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "finetune.json"


def train(ckpt: Path, *flags: str) -> float:
    """Run the trainer as one local worker; return its wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "CAPSTAN_"))}
    env |= {"PYTHONPATH": str(ROOT / "workloads"), "PET_NPROC_PER_NODE": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "capstan_workloads.train", "--checkpoint-dir", str(ckpt),
           "--metrics-port", "0", "--checkpoint-every", "0", "--log-every", "100", *flags]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"trainer failed ({p.returncode}):\n{p.stdout[-4000:]}{p.stderr[-4000:]}")
    return time.perf_counter() - t0


def base_heldout(base: Path, examples: int) -> float:
    sys.path.insert(0, str(ROOT / "workloads"))
    import torch

    from capstan_workloads.export import load_export
    from capstan_workloads.sft import HELDOUT_SEED, SFTExamples, generate_pairs, heldout_loss

    model, tok = load_export(base)
    data = SFTExamples(tok, generate_pairs(examples, HELDOUT_SEED), model.cfg.block_size)
    return heldout_loss(model, data, torch.device("cpu"))


def run(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    base_ckpt = root / "base"
    shape = ["--n-layer", str(args.n_layer), "--n-embd", str(args.n_embd), "--n-head", "4"]
    train(base_ckpt, "--steps", str(args.base_steps), "--seq-len", "64", "--batch-size", "16",
          "--corpus-chars", "400000", *shape)
    base = base_ckpt / "export"
    common = ["--task", "sft", "--base-model", str(base), "--steps", str(args.steps), "--batch-size",
              str(args.batch_size), "--sft-examples", str(args.examples), "--heldout-examples",
              str(args.heldout), "--seed", "11"]
    runs: dict[str, dict[str, Any]] = {}
    for name, flags in (
        ("full", ["--lr", str(args.full_lr)]),
        ("lora", ["--lr", str(args.lora_lr), "--lora-rank", str(args.rank), "--lora-alpha",
                  str(2 * args.rank), "--lora-targets", args.targets, "--weight-decay", "0"]),
    ):
        seconds = train(root / name, *common, *flags)
        runs[name] = json.loads((root / name / "sft" / "eval.json").read_text()) | {
            "seconds": round(seconds, 2), "flags": flags}
    full, lora = runs["full"], runs["lora"]
    base_loss = base_heldout(base, args.heldout)
    margin_loss = full["heldout_loss"] + args.margin * (base_loss - full["heldout_loss"])
    return {
        "model": {"n_layer": args.n_layer, "n_embd": args.n_embd, "base_params": full["total_params"]},
        "steps": args.steps,
        "batch_size": args.batch_size,
        "base_heldout_loss": round(base_loss, 4),
        "full": {k: full[k] for k in ("heldout_loss", "trainable_params", "optimizer_state_bytes", "seconds",
                                      "flags")},
        "lora": {k: lora[k] for k in ("heldout_loss", "trainable_params", "optimizer_state_bytes", "seconds",
                                      "flags")} | {"rank": args.rank, "targets": args.targets},
        "trainable_ratio": round(lora["trainable_params"] / full["trainable_params"], 4),
        "optimizer_state_ratio": round(lora["optimizer_state_bytes"] / full["optimizer_state_bytes"], 4),
        "margin": args.margin,
        "lora_max_heldout_loss": round(margin_loss, 4),
        "lora_share_of_full_improvement": round(
            (base_loss - lora["heldout_loss"]) / (base_loss - full["heldout_loss"]), 4),
        "lora_within_margin": lora["heldout_loss"] <= margin_loss,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--base-steps", type=int, default=400)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each method")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=4000)
    p.add_argument("--heldout", type=int, default=400)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="qkv,proj,fc")
    p.add_argument("--full-lr", type=float, default=1e-3)
    p.add_argument("--lora-lr", type=float, default=1e-2)
    p.add_argument("--margin", type=float, default=0.05,
                   help="LoRA's held-out loss may exceed the full fine-tune's by this fraction of the "
                   "full fine-tune's improvement over the base")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="capstan-finetune-bench-") as tmp:
        result = run(Path(tmp), args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0 if result["lora_within_margin"] else 1


if __name__ == "__main__":
    sys.exit(main())
