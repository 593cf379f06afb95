"""Paged KV cache, batched engine and model-dir loading, without HTTP."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from capstan_workloads.serve.engine import Engine, SamplingParams
from capstan_workloads.serve.kvcache import BlockAllocator, OutOfBlocks, PagedKVCache
from capstan_workloads.serve.loader import ModelDirError, load_model_dir
from capstan_workloads.serve.testing import make_model_dir, reference_generate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), train_steps=40)


def test_allocator_all_or_nothing_and_reuse() -> None:
    alloc = BlockAllocator(4)
    a = alloc.allocate(3)
    with pytest.raises(OutOfBlocks):
        alloc.allocate(2)
    assert alloc.num_free == 1  # a failed allocation takes nothing
    alloc.free(a)
    assert alloc.num_free == 4 and alloc.num_used == 0
    assert sorted(alloc.allocate(4)) == [0, 1, 2, 3]


@torch.inference_mode()
def test_batched_decode_over_scattered_blocks_matches_full_recompute(model_dir: Path) -> None:
    """Prefill + per-step batched decode through shuffled block tables == GPT.forward on the full sequence."""
    lm = load_model_dir(model_dir)
    cache = PagedKVCache(lm.config.n_layer, lm.config.n_embd, num_blocks=80, block_tokens=4)
    # Shuffle the free list so every sequence's blocks are scattered across the pool.
    free = list(range(80))
    random.Random(0).shuffle(free)
    cache.allocator._free.clear()
    cache.allocator._free.extend(free)
    engine = Engine(lm.model, cache, attn_group=2)  # several attention groups, reordered by length
    prompts = [lm.tokenizer.encode(p) for p in ("the ", "a capstan is", "p", "continuous batching adm")]
    tables = [cache.allocator.allocate(cache.blocks_for(lm.config.block_size)) for _ in prompts]
    greedy = [SamplingParams(temperature=0.0)] * len(prompts)
    seqs = [list(p) for p in prompts]
    logits = engine.prefill(prompts, tables)
    for _ in range(30):
        for seq, tok in zip(seqs, engine.sample(logits, greedy, [None] * len(seqs)), strict=True):
            seq.append(tok)
        for i, seq in enumerate(seqs):
            ref, _ = lm.model(torch.tensor([seq[:-1]]))
            assert torch.allclose(ref[0, -1], logits[i], atol=1e-4)
        logits = engine.decode([s[-1] for s in seqs], [len(s) - 1 for s in seqs], tables)
    for prompt, seq in zip(prompts, seqs, strict=True):
        assert seq[len(prompt) :] == reference_generate(lm.model, prompt, 30, eos_id=-1)


def test_top_p_tiny_is_greedy_and_seed_is_reproducible(model_dir: Path) -> None:
    lm = load_model_dir(model_dir)
    engine = Engine(lm.model, PagedKVCache(lm.config.n_layer, lm.config.n_embd, 8))
    logits = torch.randn(3, lm.config.vocab_size)
    nucleus = [SamplingParams(temperature=1.0, top_p=1e-6)] * 3
    gens: list[torch.Generator | None] = [torch.Generator().manual_seed(i) for i in range(3)]
    assert engine.sample(logits, nucleus, gens) == logits.argmax(-1).tolist()
    hot = [SamplingParams(temperature=1.5)] * 3
    a = [engine.sample(logits, hot, [torch.Generator().manual_seed(7)] * 3) for _ in range(2)]
    assert a[0] == a[1]


def test_missing_file_is_named(tmp_path: Path, model_dir: Path) -> None:
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ModelDirError, match=r"missing tokenizer\.json"):
        load_model_dir(tmp_path)
    with pytest.raises(ModelDirError, match="does not exist"):
        load_model_dir(tmp_path / "nope")


def test_shape_mismatch_is_explained(tmp_path: Path, model_dir: Path) -> None:
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["n_embd"] *= 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelDirError, match=r"tok_emb.weight: shape .* != expected"):
        load_model_dir(tmp_path)


@torch.inference_mode()
def test_scheduler_admits_mid_flight_retires_and_frees(model_dir: Path) -> None:
    """Drive the scheduler by hand: joins at the next step, EOS/length retire, cancel frees blocks."""
    from capstan_workloads.serve.metrics import ServingMetrics
    from capstan_workloads.serve.scheduler import Event, FinishEvent, Scheduler

    lm = load_model_dir(model_dir)
    cache = PagedKVCache(lm.config.n_layer, lm.config.n_embd, num_blocks=12, block_tokens=8)
    sched = Scheduler(Engine(lm.model, cache), lm.tokenizer, ServingMetrics(), max_batch_size=4)
    events: dict[str, list[Event]] = {"a": [], "b": [], "c": []}
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    a = sched.submit(lm.tokenizer.encode("the "), greedy, events["a"].append)
    sched.step()
    assert len(a.output) == 1 and cache.allocator.num_used == 2  # ceil((4 + 10 - 1) / 8)
    sched.step()
    b = sched.submit(lm.tokenizer.encode("a capstan"), greedy, events["b"].append)
    # sampled, so EOS could retire it at random; ignore_eos keeps it running until it is cancelled
    sampled = SamplingParams(max_tokens=50, ignore_eos=True)
    c = sched.submit(lm.tokenizer.encode("p"), sampled, events["c"].append)
    sched.step()  # b and c join the running batch; a keeps decoding in the same step
    assert len(a.output) == 3 and len(b.output) == 1 and len(c.output) == 1 and len(sched.running) == 3
    sched.cancel(c)
    sched.step()
    assert c not in sched.running and events["c"][-1] == FinishEvent("abort", 1, 1)
    while sched.running:
        sched.step()
    assert cache.allocator.num_used == 0
    fin = events["a"][-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "length" and fin.completion_tokens == 10
    assert a.output == reference_generate(lm.model, a.prompt, 10, lm.tokenizer.eos_id)


def test_blocks_needed_caps_at_block_size(model_dir: Path) -> None:
    from capstan_workloads.serve.metrics import ServingMetrics
    from capstan_workloads.serve.scheduler import Scheduler

    lm = load_model_dir(model_dir)
    cache = PagedKVCache(lm.config.n_layer, lm.config.n_embd, num_blocks=8, block_tokens=16)
    sched = Scheduler(Engine(lm.model, cache), lm.tokenizer, ServingMetrics())
    assert sched.blocks_needed(10, 1) == 1
    assert sched.blocks_needed(10, 7) == 1  # 16 tokens fed at most
    assert sched.blocks_needed(10, 8) == 2
    assert sched.blocks_needed(10, 10_000) == cache.blocks_for(lm.config.block_size - 1)
