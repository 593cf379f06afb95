"""Paged KV cache, batched engine and model-dir loading, without HTTP."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capstan_workloads.serve import app as app_module
from capstan_workloads.serve.engine import Engine, SamplingParams
from capstan_workloads.serve.kvcache import PagedKVCache
from capstan_workloads.serve.loader import LoadedModel, ModelDirError, load_model_dir
from capstan_workloads.serve.metrics import ServingMetrics
from capstan_workloads.serve.scheduler import Event, FinishEvent, Scheduler, TokenEvent
from capstan_workloads.serve.testing import CORPUS, make_model_dir, reference_generate


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), train_steps=40)


@pytest.fixture(scope="module")
def lm(model_dir: Path) -> LoadedModel:
    return load_model_dir(model_dir)


@torch.inference_mode()
def test_batched_decode_over_scattered_blocks_matches_full_recompute(model_dir: Path) -> None:
    """Prefill + per-step batched decode through shuffled block tables == GPT.forward on the full sequence."""
    lm = load_model_dir(model_dir)
    cache = PagedKVCache(lm.config.n_layer, lm.config.n_embd, num_blocks=80, block_tokens=4)
    # Shuffle the free list so every sequence's blocks are scattered across the pool.
    free = list(range(80))
    random.Random(0).shuffle(free)
    cache.manager._free.clear()
    cache.manager._free.extend(free)
    engine = Engine(lm.model, cache, attn_group=2)  # several attention groups, reordered by length
    prompts = [lm.tokenizer.encode(p) for p in ("the ", "a capstan is", "p", "continuous batching adm")]
    tables = [cache.manager.allocate(cache.blocks_for(lm.config.block_size)) for _ in prompts]
    greedy = [SamplingParams(temperature=0.0)] * len(prompts)
    seqs = [list(p) for p in prompts]
    logits = engine.prefill(prompts, [0] * len(prompts), tables)
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


def _scheduler(lm: LoadedModel, num_blocks: int, block_tokens: int, **kw: object) -> Scheduler:
    cache = PagedKVCache(
        lm.config.n_layer,
        lm.config.n_embd,
        num_blocks=num_blocks,
        block_tokens=block_tokens,
        prefix_caching=bool(kw.pop("prefix_caching", True)),
    )
    return Scheduler(Engine(lm.model, cache), lm.tokenizer, ServingMetrics(), **kw)  # type: ignore[arg-type]


@torch.inference_mode()
def test_scheduler_admits_mid_flight_retires_and_frees(lm: LoadedModel) -> None:
    """Drive the scheduler by hand: joins at the next step, EOS/length retire, cancel frees blocks."""
    sched = _scheduler(lm, num_blocks=12, block_tokens=8, max_batch_size=4)
    cache = sched.cache
    events: dict[str, list[Event]] = {"a": [], "b": [], "c": []}
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    a = sched.submit(lm.tokenizer.encode("the "), greedy, events["a"].append)
    sched.step()
    assert len(a.seqs[0].output) == 1 and cache.manager.num_used == 2  # ceil((4 + 10 - 1) / 8)
    sched.step()
    b = sched.submit(lm.tokenizer.encode("a capstan"), greedy, events["b"].append)
    # sampled, so EOS could retire it at random; ignore_eos keeps it running until it is cancelled
    sampled = SamplingParams(max_tokens=50, ignore_eos=True)
    c = sched.submit(lm.tokenizer.encode("p"), sampled, events["c"].append)
    sched.step()  # b and c join the running batch; a keeps decoding in the same step
    assert [len(r.seqs[0].output) for r in (a, b, c)] == [3, 1, 1] and len(sched.running) == 3
    sched.cancel(c)
    sched.step()
    fin_c = events["c"][-1]
    assert c.seqs[0] not in sched.running
    assert isinstance(fin_c, FinishEvent) and (fin_c.reason, fin_c.completion_tokens) == ("abort", 1)
    while sched.running:
        sched.step()
    assert cache.manager.num_used == 0
    fin = events["a"][-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "length" and fin.completion_tokens == 10
    assert a.seqs[0].output == reference_generate(lm.model, a.prompt, 10, lm.tokenizer.eos_id)
    assert fin.text == lm.tokenizer.decode(a.seqs[0].output)


def test_blocks_needed_caps_at_block_size(lm: LoadedModel) -> None:
    sched = _scheduler(lm, num_blocks=8, block_tokens=16)
    assert sched.blocks_needed(10, 1) == 1
    assert sched.blocks_needed(10, 7) == 1  # 16 tokens fed at most
    assert sched.blocks_needed(10, 8) == 2
    assert sched.blocks_needed(10, 10_000) == sched.cache.blocks_for(lm.config.block_size - 1)
    # n choices share the prompt's block; each needs its own copy of it, as it is partial.
    assert sched.blocks_needed(10, 8, n=3) == 1 + 3 * (1 + 1)


def _run(sched: Scheduler, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy outputs; the first prompt is prefilled alone, so the others can hit its blocks."""
    outputs: list[list[int]] = [[] for _ in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    def collect(i: int) -> object:
        def emit(ev: Event) -> None:
            if isinstance(ev, TokenEvent):
                outputs[i].append(ev.token_id)

        return emit

    sched.submit(prompts[0], params, collect(0))  # type: ignore[arg-type]
    sched.step()
    for i, p in enumerate(prompts[1:], 1):
        sched.submit(p, params, collect(i))  # type: ignore[arg-type]
    while sched.running or sched.waiting:
        sched.step()
    return outputs


SYSTEM = CORPUS[:30]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    suffixes=st.lists(st.text(alphabet="abcdefghij ", min_size=0, max_size=12), min_size=1, max_size=4),
    block_tokens=st.sampled_from([4, 8]),
)
@torch.inference_mode()
def test_greedy_outputs_identical_with_and_without_prefix_cache(
    lm: LoadedModel, suffixes: list[str], block_tokens: int
) -> None:
    prompts = [lm.tokenizer.encode(SYSTEM + s) for s in ["", *suffixes]]
    on = _scheduler(lm, num_blocks=64, block_tokens=block_tokens)
    off = _scheduler(lm, num_blocks=64, block_tokens=block_tokens, prefix_caching=False)
    with_cache = _run(on, prompts, 12)
    assert with_cache == _run(off, prompts, 12)
    assert with_cache[0] == reference_generate(lm.model, prompts[0], 12, eos_id=-1)
    # Every later prompt found the shared system prompt's full blocks.
    hits = on.metrics.prefix_cache_hit_tokens._value.get()
    assert hits >= len(suffixes) * (len(prompts[0]) // block_tokens) * block_tokens
    assert off.metrics.prefix_cache_hit_tokens._value.get() == 0
    assert on.blocks.num_used == off.blocks.num_used == 0


@torch.inference_mode()
def test_n_choices_share_the_prompt_and_copy_on_write(lm: LoadedModel) -> None:
    """Sampled choices of one request write into the shared partial block: each gets its own copy."""
    sched = _scheduler(lm, num_blocks=40, block_tokens=8)
    prompt = lm.tokenizer.encode("a capstan is")  # 12 tokens: one full block and a partial one
    events: list[Event] = []
    n, seed = 3, 7
    req = sched.submit(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=seed, n=n), events.append)
    sched.step()
    shared = req.seqs[0].blocks[:2]
    assert all(s.blocks[:2] == shared for s in req.seqs)
    assert sched.blocks.refcount[shared[1]] == n
    sched.step()  # each choice writes its first token at position 12, inside the shared block
    assert len({s.blocks[1] for s in req.seqs}) == n and sched.blocks.refcount[shared[0]] == n
    while sched.running:
        sched.step()
    fins = sorted((e for e in events if isinstance(e, FinishEvent)), key=lambda f: f.index)
    assert [f.index for f in fins] == list(range(n))
    # Each choice equals the same seed run alone as a single choice: copying changed nothing.
    for f in fins:
        alone: list[Event] = []
        solo = _scheduler(lm, num_blocks=40, block_tokens=8)
        solo.submit(prompt, SamplingParams(max_tokens=20, temperature=1.0, seed=seed + f.index), alone.append)
        while solo.running or solo.waiting:
            solo.step()
        last = alone[-1]
        assert isinstance(last, FinishEvent) and last.text == f.text
    assert sched.blocks.num_used == 0


@torch.inference_mode()
def test_stop_string_ends_the_choice_and_frees_its_blocks(lm: LoadedModel) -> None:
    prompt = lm.tokenizer.encode("the quick")
    greedy = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    full = lm.tokenizer.decode(reference_generate(lm.model, prompt, 30, eos_id=-1))
    stop = full[10:13]
    want = full[: full.find(stop)]
    sched = _scheduler(lm, num_blocks=12, block_tokens=8)
    events: list[Event] = []
    sched.submit(prompt, dataclasses.replace(greedy, stop=("zzz", stop)), events.append)
    while sched.running or sched.waiting:
        sched.step()
    fin = events[-1]
    assert isinstance(fin, FinishEvent) and fin.reason == "stop" and fin.text == want
    streamed = "".join(e.text for e in events if isinstance(e, TokenEvent)) + fin.tail
    assert streamed == want and sched.blocks.num_used == 0


def test_device_auto_prefers_cuda_and_cpu_can_be_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert app_module.resolve_device("auto").type == "cuda"
    assert app_module.resolve_device("cpu").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app_module.resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):
        app_module.resolve_device("cuda")
