"""End to end on the local executor: pre-train, LoRA fine-tune from its snapshot (checkpoint.restoreFrom,
spec.fineTune), serve the base with the adapter and query both by model name."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.api.bodies import make_modelserving, make_trainingjob

from capstan.api.modelserving import ModelServing
from capstan.local.serving import LocalServingError, resolve_adapter_dirs, start_server
from capstan.local.session import run_local

pytest.importorskip("torch")
pytestmark = pytest.mark.slow

PRETRAIN = ["-m", "capstan_workloads.train", "--steps", "60", "--batch-size", "8", "--seq-len", "64",
            "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--checkpoint-every", "0",
            "--corpus-chars", "100000"]
SFT = ["-m", "capstan_workloads.train", "--steps", "30", "--batch-size", "8", "--checkpoint-every", "10",
       "--lr", "1e-2", "--sft-examples", "200", "--heldout-examples", "50"]
ENV = [{"name": "OMP_NUM_THREADS", "value": "1"}]


def job(name: str, args: list[str], **spec: Any) -> Any:
    return (make_trainingjob(name).image("local", sys.executable, "-m", "torch.distributed.run").workers(2)
            .spec(args=args, env=ENV, **spec).model())


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_pretrain_then_lora_from_its_snapshot_then_serve_base_and_adapter(
    tmp_path: Path, capsys: Any
) -> None:
    base = job("base", PRETRAIN, checkpoint={"volume": {"size": "1Gi"}})
    ft = job("sql", SFT, checkpoint={"volume": {"size": "1Gi"}, "restoreFrom": "base-60"},
             fineTune={"lora": {"rank": 4, "targetModules": ["qkv", "fc"]}})
    ms = make_modelserving("gpt").from_training_job("base").spec(
        gpu=False, adapters=[{"name": "sql-v1", "fromTrainingJob": {"name": "sql"}, "rank": 4}]).model()
    assert run_local([base, ft, ms], tmp_path, prompts=["the "]) == 0
    out = capsys.readouterr().out
    assert "checkpoint directory seeded from snapshot base-60 (checkpoint.restoreFrom)" in out
    assert "trainingjob/sql Succeeded" in out

    # The fine-tune kept to its own directory next to the restored base, and exported the adapter.
    ckpt = tmp_path / "sql" / "checkpoints"
    assert (ckpt / "export" / "model.safetensors").is_file()  # the base's, restored
    record = json.loads((ckpt / "sft" / "eval.json").read_text())
    assert record["method"] == "lora" and record["trainable_params"] == 4 * ((32 + 96) + (32 + 128))
    config = json.loads((ckpt / "sft" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["target_modules"]) == (4, ["fc", "qkv"])

    assert isinstance(ms, ModelServing)
    ((name, path),) = resolve_adapter_dirs(ms, tmp_path)
    assert name == "sql-v1" and path.match("*/sql/snapshots/*/sft/adapter")
    server = start_server(ms, tmp_path)
    try:
        server.wait_ready()
        url = f"{server.url}/v1/completions"
        prompt = {"prompt": "reverse the gang saves\n", "max_tokens": 24, "temperature": 0}
        s_base, base_answer = post(url, {**prompt, "model": "gpt"})
        s_lora, lora_answer = post(url, {**prompt, "model": "sql-v1"})
        assert (s_base, s_lora) == (200, 200)
        assert lora_answer["model"] == "sql-v1"
        assert lora_answer["choices"][0]["text"] != base_answer["choices"][0]["text"]
        assert post(url, {**prompt, "model": "nope"})[0] == 404
    finally:
        server.stop()


def test_restore_from_an_unknown_snapshot_is_a_clear_error(tmp_path: Path, capsys: Any) -> None:
    ft = job("sql", SFT, checkpoint={"volume": {"size": "1Gi"}, "restoreFrom": "base-60"},
             fineTune={"method": "full"})
    assert run_local([ft], tmp_path, prompts=[]) == 1
    assert "spec.checkpoint.restoreFrom: no snapshot 'base-60'" in capsys.readouterr().out


def test_adapter_of_a_job_without_snapshot_is_a_clear_error(tmp_path: Path) -> None:
    ms = make_modelserving("gpt").from_training_job("base").spec(
        gpu=False, adapters=[{"name": "a", "fromTrainingJob": {"name": "never"}}]).model()
    assert isinstance(ms, ModelServing)
    with pytest.raises(LocalServingError, match=r"adapters\[0\].fromTrainingJob: trainingjob/never has no"):
        resolve_adapter_dirs(ms, tmp_path)
