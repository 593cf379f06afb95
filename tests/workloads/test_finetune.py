"""sft and LoRA in the reference trainer: real torchrun gangs of two gloo workers fine-tuning a real base."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

from capstan_workloads.exitcodes import EXIT_BAD_ARGS, EXIT_FAILED, EXIT_PREEMPTED
from capstan_workloads.export import load_export
from capstan_workloads.lora import LoRALinear, apply_lora, merged_tensors
from capstan_workloads.model import GPT, GPTConfig
from capstan_workloads.sft import IGNORE, encode_pair, heldout_loss
from capstan_workloads.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

_DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK",
              "CAPSTAN_CHECKPOINT_DIR", "CAPSTAN_EXPORT_DIR", "CAPSTAN_METRICS_PORT", "CAPSTAN_BASE_MODEL",
              "CAPSTAN_TASK", "CAPSTAN_LORA_RANK", "CAPSTAN_LORA_ALPHA", "CAPSTAN_LORA_TARGETS",
              "CAPSTAN_LORA_MERGE")
STEPS = 40
SFT = ["--task", "sft", "--steps", str(STEPS), "--batch-size", "8", "--lr", "5e-3", "--seed", "7",
       "--metrics-port", "0", "--checkpoint-every", "10", "--keep", "2", "--log-every", "10",
       "--sft-examples", "800", "--heldout-examples", "100"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "qkv,mlp.fc"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS and not k.startswith("PET_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(ckpt: Path, *flags: str, restart: int = 0) -> tuple[int, str]:
    """One node, two gloo workers; returns (exit code, output)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "capstan_workloads.train", "--checkpoint-dir", str(ckpt), *SFT, *flags]
    p = subprocess.run(cmd, env=_env(CAPSTAN_RESTART_COUNT=str(restart)), capture_output=True, text=True,
                       timeout=240)
    return p.returncode, p.stdout + p.stderr


def losses(run: Path, restart: int | None = None) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in (run / "losses.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if restart is None or rec["restart"] == str(restart):
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-trained base export (one worker, a few seconds)."""
    ckpt = tmp_path_factory.mktemp("base")
    cmd = [sys.executable, "-m", "capstan_workloads.train", "--steps", "120", "--n-embd", "64", "--seq-len",
           "64", "--batch-size", "16", "--corpus-chars", "200000", "--metrics-port", "0",
           "--checkpoint-every", "0", "--checkpoint-dir", str(ckpt)]
    p = subprocess.run(cmd, env=_env(PET_NPROC_PER_NODE="1"), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    return ckpt / "export"


@pytest.fixture(scope="module")
def lora_run(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted two-worker LoRA run: the yardstick for resume."""
    ckpt = tmp_path_factory.mktemp("lora")
    code, out = torchrun(ckpt, "--base-model", str(base), *LORA, "--merge")
    assert code == 0, out
    return ckpt / "sft", out


def test_sft_example_masks_the_prompt_and_padding() -> None:
    tok = Tokenizer.build(["reverse the gang saves 0123456789 times."])
    x, y = encode_pair(tok, "reverse the gang", "gang the.", 40)
    head = len(tok.encode("reverse the gang\n", bos=True))
    answer = [*tok.encode("gang the."), tok.eos_id]
    assert x.shape == y.shape == (40,)
    assert y[: head - 1].tolist() == [IGNORE] * (head - 1)  # no loss on the prompt
    assert y[head - 1 : head - 1 + len(answer)].tolist() == answer  # the response and <eos>
    assert (y[head - 1 + len(answer) :] == IGNORE).all()  # nor on padding
    with pytest.raises(ValueError, match="does not fit the base model's block_size 8"):
        encode_pair(tok, "reverse the gang", "gang the.", 8)


def test_merged_weights_compute_what_the_adapter_does() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    adapted = apply_lora(model, ["qkv", "proj"], r=4, alpha=8)
    assert adapted == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.proj",
                       "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.proj"]
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight)  # B starts at zero: make the adapter do something
    assert all(p.requires_grad == (".lora_" in n) for n, p in model.named_parameters())
    merged = GPT(model.cfg).eval()
    merged.load_state_dict(merged_tensors(model.state_dict(), 8 / 4), strict=True)
    ids = torch.randint(0, 20, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids)[0], model(ids)[0], rtol=1e-4, atol=1e-4)


def test_lora_gang_trains_only_the_adapter_and_exports_it_in_peft_format(
    base: Path, lora_run: tuple[Path, str]
) -> None:
    run, out = lora_run
    assert "LoRA rank 4 alpha 8 on 4 layers (blocks.0.attn.qkv, blocks.0.mlp.fc, blocks.1.attn.qkv" in out
    record = json.loads((run / "eval.json").read_text())
    assert record["method"] == "lora" and record["steps"] == STEPS
    # Trainable: rank 4 x (in + out) of qkv (64 -> 192) and fc (64 -> 256), in each of the 2 blocks.
    assert record["trainable_params"] == 2 * 4 * ((64 + 192) + (64 + 256))
    # AdamW keeps two fp32 moments per trainable value.
    assert record["optimizer_state_bytes"] == 2 * 4 * record["trainable_params"]

    base_model, tok = load_export(base)
    assert record["heldout_loss"] < 0.8 * heldout_from(base_model, tok), "LoRA did not learn the task"

    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    assert config["target_modules"] == ["mlp.fc", "qkv"]
    assert config["capstan"]["base_fingerprint"] == record["base_fingerprint"]
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(
        f"base_model.model.blocks.{b}.{m}.lora_{p}.weight" for b in (0, 1) for m in ("attn.qkv", "mlp.fc")
        for p in "AB"
    )
    assert tensors["base_model.model.blocks.0.attn.qkv.lora_A.weight"].shape == (4, 64)
    assert tensors["base_model.model.blocks.0.attn.qkv.lora_B.weight"].shape == (192, 4)

    # The merged export is the base plus the adapter: same held-out loss as the run measured.
    merged, _ = load_export(run / "export")
    assert heldout_from(merged, tok) == pytest.approx(record["heldout_loss"], rel=1e-4)
    # ...and the base export next to it is untouched.
    adapter = run / "adapter" / "adapter_model.safetensors"
    assert (base / "model.safetensors").stat().st_mtime < adapter.stat().st_mtime


def heldout_from(model: GPT, tok: Tokenizer) -> float:
    from capstan_workloads.sft import HELDOUT_SEED, SFTExamples, generate_pairs

    examples = SFTExamples(tok, generate_pairs(100, HELDOUT_SEED), model.cfg.block_size)
    return heldout_loss(model, examples, torch.device("cpu"))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_lora_sigterm_checkpoints_the_adapter_alone_and_resumes_on_the_same_curve(
    base: Path, lora_run: tuple[Path, str], tmp_path: Path
) -> None:
    want = losses(lora_run[0])
    # As the kubelet stops a container: SIGTERM to `python -m capstan_workloads.train` (the launcher).
    cmd = [sys.executable, "-m", "capstan_workloads.train", "--checkpoint-dir", str(tmp_path), *SFT,
           "--base-model", str(base), *LORA, "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, env=_env(PET_NPROC_PER_NODE="2"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "sft" / "losses.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 5) and proc.poll() is None:
        assert time.monotonic() < deadline, "no training steps"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == EXIT_PREEMPTED, out
    stopped = max(losses(tmp_path / "sft"))
    assert stopped < STEPS, "the run finished before SIGTERM"
    ckpt = tmp_path / "sft" / f"step-{stopped:08d}"
    assert (tmp_path / "sft" / "latest").read_text().strip() == ckpt.name

    # The checkpoint holds the adapter, its optimizer state and the base's fingerprint, not the base.
    keys = set(dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata)
    model_keys = {k.removeprefix("app.model.") for k in keys if k.startswith("app.model.")}
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), sorted(model_keys)
    assert len(model_keys) == 8
    assert "app.base" in keys
    assert not any("tok_emb" in k for k in keys)

    code, out = torchrun(tmp_path, "--base-model", str(base), *LORA, restart=1)
    assert code == 0, out
    assert f"resumed from {ckpt.name} (step {stopped})" in out
    got = losses(tmp_path / "sft", restart=1)
    assert min(got) == stopped + 1
    for s in range(stopped + 1, STEPS + 1):
        assert got[s] == pytest.approx(want[s], rel=1e-5), f"step {s}: {got[s]} != uninterrupted {want[s]}"
    # Same steps, same data, same adapter: the same exported weights.
    a = load_file(str(tmp_path / "sft" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(lora_run[0] / "adapter" / "adapter_model.safetensors"))
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)

    # A resume on top of another base is refused, naming both.
    other = lora_run[0] / "export"  # the merged model: a different base
    code, out = torchrun(tmp_path, "--base-model", str(other), *LORA, "--steps", str(STEPS + 5), restart=2)
    assert code == EXIT_FAILED, out
    assert "checkpoint was trained on base sha256:" in out and "resume with the same --base-model" in out


def test_full_sft_gang_resumes_from_the_checkpoint_volume_it_was_restored_into(
    base: Path, tmp_path: Path
) -> None:
    # What checkpoint.restoreFrom leaves: the pre-training job's files, its export among them.
    (tmp_path / "export").mkdir()
    for f in base.iterdir():
        (tmp_path / "export" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "latest").write_text("step-00000120\n")  # the base job's, never read by sft
    code, out = torchrun(tmp_path, "--steps", "20", "--lr", "1e-3")
    assert code == 0, out
    assert "(full fine-tune)" in out and f"sft from {tmp_path / 'export'}" in out
    record = json.loads((tmp_path / "sft" / "eval.json").read_text())
    assert record["method"] == "full" and record["trainable_params"] == record["total_params"]
    assert (tmp_path / "latest").read_text() == "step-00000120\n"
    code, out = torchrun(tmp_path, "--steps", "30", "--lr", "1e-3", restart=1)
    assert code == 0, out
    assert "resumed from step-00000020 (step 20)" in out
    model, tok = load_export(tmp_path / "sft" / "export")
    base_model, _ = load_export(base)
    assert heldout_from(model, tok) < heldout_from(base_model, tok)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--task", "sft", "--lora-rank", "4", "--lora-targets", "q_proj"],
         "--lora-targets: q_proj matches no linear layer of the GPT"),
        (["--lora-rank", "4"], "--lora-rank and --merge need --task sft"),
        (["--task", "sft", "--lora-rank", "-1"], "--lora-rank must be >= 0"),
        (["--task", "sft", "--merge"], "--merge needs --lora-rank"),
    ],
)
def test_bad_finetune_flags_exit_2_naming_the_flag(base: Path, tmp_path: Path, flags: list[str],
                                                   message: str) -> None:
    cmd = [sys.executable, "-m", "capstan_workloads.train", "--base-model", str(base), *flags]
    p = subprocess.run(cmd, env=_env(CAPSTAN_CHECKPOINT_DIR=str(tmp_path)), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == EXIT_BAD_ARGS, p.stderr
    assert message in p.stderr


def test_missing_base_model_exits_2(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "capstan_workloads.train", "--task", "sft"]
    p = subprocess.run(cmd, env=_env(CAPSTAN_CHECKPOINT_DIR=str(tmp_path)), capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == EXIT_BAD_ARGS
    assert f"--base-model {tmp_path / 'export'}: no model.safetensors there" in p.stderr


def test_operator_fine_tune_spec_reaches_the_trainer_as_its_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # spec.fineTune -> worker env (the operator's rendering) -> the trainer's flag defaults.
    from capstan.api.trainingjob import TrainingJob
    from capstan.training.pods import worker_env
    from capstan_workloads.train import parse_args

    job = TrainingJob.model_validate({
        "metadata": {"name": "ft", "namespace": "ml"},
        "spec": {"image": "ghcr.io/capstan-dev/capstan-trainer:0.1.0", "workers": 2,
                 "checkpoint": {"volume": {"size": "1Gi"}, "restoreFrom": "pretrain-snap"},
                 "fineTune": {"lora": {"rank": 4, "targetModules": ["qkv", "fc"]}, "merge": True}},
    })
    env = {e["name"]: e["value"] for e in worker_env(job, 0, 0)}
    fine_tune = ("CAPSTAN_TASK", "CAPSTAN_BASE", "CAPSTAN_LORA")
    assert {k: v for k, v in env.items() if k.startswith(fine_tune)} == {
        "CAPSTAN_TASK": "sft", "CAPSTAN_BASE_MODEL": "export", "CAPSTAN_LORA_RANK": "4",
        "CAPSTAN_LORA_ALPHA": "8", "CAPSTAN_LORA_TARGETS": "qkv,fc", "CAPSTAN_LORA_MERGE": "1"}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.safetensors").write_bytes(b"")
    for k, v in {**env, "CAPSTAN_CHECKPOINT_DIR": str(tmp_path)}.items():
        if k.startswith("CAPSTAN_"):
            monkeypatch.setenv(k, v)
    args = parse_args([])
    assert (args.task, args.base_model, args.lora_rank, args.lora_alpha, args.lora_targets, args.merge) == (
        "sft", tmp_path / "export", 4, 8.0, ["qkv", "fc"], True)
    assert args.checkpoint_dir == tmp_path / "sft" and args.adapter_dir == tmp_path / "sft" / "adapter"
    assert parse_args(["--lora-rank", "2"]).lora_rank == 2  # explicit args still win
