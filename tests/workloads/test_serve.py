"""The inference server over real HTTP on 127.0.0.1, against a tiny model built in the test."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from capstan_workloads.serve import app as app_module
from capstan_workloads.serve.app import ServerState, create_app
from capstan_workloads.serve.loader import load_model_dir
from capstan_workloads.serve.testing import make_model_dir, reference_generate
from capstan_workloads.serve.testing import serving as serve_in_process

PROMPTS = [
    "the ",
    "a capstan is a",
    "p",
    "continuous batching admits new",
    "paged attention keeps",
    "x",
    "the quick brown fox jumps",
    "sailing ships",
    "kv cache in fixed",
    "ropes. ",
    "lazy",
    "abc",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("model"), block_size=64, train_steps=40)


@asynccontextmanager
async def serving(
    model_dir: Path, wait_ready: bool = True, **limits: Any
) -> AsyncIterator[tuple[str, ServerState]]:
    """Run create_app on an ephemeral 127.0.0.1 port; yield its base URL and state."""
    async with serve_in_process(model_dir, wait_ready, **limits) as served:
        yield served


async def complete(
    s: aiohttp.ClientSession, url: str, path: str = "/v1/completions", **body: Any
) -> tuple[int, dict[str, Any]]:
    async with s.post(f"{url}{path}", json=body) as r:
        return r.status, await r.json()


async def chat(s: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, dict[str, Any]]:
    return await complete(s, url, "/v1/chat/completions", **body)


async def stream(s: aiohttp.ClientSession, url: str, path: str = "/v1/completions", **body: Any) -> list[Any]:
    """POST with stream=true; return the decoded ``data:`` payloads ("[DONE]" kept as a string)."""
    async with s.post(f"{url}{path}", json={**body, "stream": True}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        raw = (await r.read()).decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


async def metric_samples(
    s: aiohttp.ClientSession, url: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with s.get(f"{url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (smp.name, tuple(sorted(smp.labels.items()))): smp.value
        for fam in text_string_to_metric_families(text)
        for smp in fam.samples
    }


async def eventually(cond: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if await cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_concurrent_greedy_equals_single_sequence_generation(model_dir: Path) -> None:
    """The key correctness test: continuous batching over paged KV must not change greedy outputs."""
    lm = load_model_dir(model_dir)
    lengths = [5, 40, 63, 17, 25, 1, 30, 50, 12, 45, 8, 60]
    expected = [
        lm.tokenizer.decode(reference_generate(lm.model, lm.tokenizer.encode(p), n, lm.tokenizer.eos_id))
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    # A small batch and small blocks force mid-flight admissions and scattered block reuse.
    async with (
        serving(model_dir, max_batch_size=5, kv_block_tokens=4) as (url, state),
        aiohttp.ClientSession() as s,
    ):
        results = await asyncio.gather(
            *(
                complete(s, url, prompt=p, max_tokens=n, temperature=0)
                for p, n in zip(PROMPTS, lengths, strict=True)
            )
        )
        assert state.scheduler is not None and state.scheduler.peak_batch == 5
    for (status, body), p, n, want in zip(results, PROMPTS, lengths, expected, strict=True):
        assert status == 200, body
        choice = body["choices"][0]
        assert choice["text"] == want, p
        ptoks = len(lm.tokenizer.encode(p))
        # 64-token context: long requests stop at block_size with finish_reason "length".
        assert body["usage"] == {
            "prompt_tokens": ptoks,
            "completion_tokens": min(n, 64 - ptoks),
            "total_tokens": ptoks + min(n, 64 - ptoks),
        }
        assert choice["finish_reason"] == "length"
        assert body["object"] == "text_completion"


async def test_stream_concatenates_to_non_stream_text(model_dir: Path) -> None:
    async with serving(model_dir) as (url, _), aiohttp.ClientSession() as s:
        req = {"prompt": "a capstan", "max_tokens": 30, "temperature": 0}
        events, (status, body) = await asyncio.gather(stream(s, url, **req), complete(s, url, **req))
    assert status == 200
    assert events[-1] == "[DONE]"
    chunks, final = events[:-2], events[-2]
    assert len(chunks) > 1 and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 30


async def test_seeded_sampling_is_reproducible_under_batching(model_dir: Path) -> None:
    async with serving(model_dir) as (url, _), aiohttp.ClientSession() as s:
        req = {"prompt": "the ", "max_tokens": 40, "temperature": 1.2, "top_p": 0.9, "seed": 1234}
        noise = [complete(s, url, prompt=p, max_tokens=30, temperature=1.0) for p in PROMPTS[:6]]
        results = await asyncio.gather(complete(s, url, **req), *noise, complete(s, url, **req))
        alone = await complete(s, url, **req)
    texts = {r[1]["choices"][0]["text"] for r in (results[0], results[-1], alone)}
    assert len(texts) == 1


async def test_backpressure_answers_429_with_retry_after(model_dir: Path) -> None:
    async with (
        serving(model_dir, max_batch_size=1, max_waiting=1, retry_after_seconds=3) as (url, _),
        aiohttp.ClientSession() as s,
    ):

        async def post() -> tuple[int, str | None]:
            async with s.post(f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 60}) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After")

        results = await asyncio.gather(*(post() for _ in range(8)))
        samples = await metric_samples(s, url)
    codes = [c for c, _ in results]
    assert set(codes) == {200, 429}, codes
    assert all(ra == "3" for c, ra in results if c == 429)
    assert samples[("capstan_serving_requests_total", (("code", "429"),))] == codes.count(429)
    assert samples[("capstan_serving_errors_total", (("kind", "overloaded"),))] == codes.count(429)


async def test_drain_finishes_in_flight_and_rejects_new(model_dir: Path) -> None:
    async with serving(model_dir, max_batch_size=2) as (url, state), aiohttp.ClientSession() as s:
        assert state.scheduler is not None
        inflight = [
            asyncio.create_task(complete(s, url, prompt=p, max_tokens=60, temperature=0, ignore_eos=True))
            for p in ("the ", "p", "x", "abc")
        ]

        async def all_submitted() -> bool:
            return state.scheduler is not None and state.scheduler.num_inflight == 4

        await eventually(all_submitted)
        drain = asyncio.create_task(state.drain(timeout=30))
        await asyncio.sleep(0)
        status, body = await complete(s, url, prompt="late", max_tokens=5)
        assert status == 503 and "draining" in body["error"]["message"]
        async with s.get(f"{url}/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "draining"
        assert await drain is True
        results = await asyncio.gather(*inflight)
    assert [st for st, _ in results] == [200] * 4
    assert all(b["usage"]["completion_tokens"] == 60 for _, b in results)


async def test_drain_timeout_aborts_leftovers(model_dir: Path) -> None:
    async with serving(model_dir, max_batch_size=1) as (url, state), aiohttp.ClientSession() as s:
        # ignore_eos: every request really runs 60 steps, so one runs while the others wait (a
        # fast, quiet machine could otherwise finish the first before the last is submitted).
        tasks = [
            asyncio.create_task(complete(s, url, prompt="the ", max_tokens=60, ignore_eos=True))
            for _ in range(3)
        ]

        async def submitted() -> bool:
            return state.scheduler is not None and state.scheduler.num_inflight >= 2

        await eventually(submitted)
        assert await state.drain(timeout=0) is False
        await state.close()  # what shutdown does after the grace period
        results = await asyncio.gather(*tasks)
        assert state.active_requests == 0
    assert {st for st, _ in results} <= {200, 503}


async def test_metrics_move_after_requests(model_dir: Path) -> None:
    async with serving(model_dir) as (url, _), aiohttp.ClientSession() as s:
        before = await metric_samples(s, url)
        assert before[("capstan_serving_kv_blocks_total", ())] > 0
        results = await asyncio.gather(
            complete(s, url, prompt="the ", max_tokens=10),
            complete(s, url, prompt="ab", max_tokens=7, temperature=0),
        )
        await complete(s, url, prompt="ab", max_tokens=0)
        after = await metric_samples(s, url)
    generated = sum(b["usage"]["completion_tokens"] for _, b in results)
    assert after[("capstan_serving_requests_total", (("code", "200"),))] == 2
    assert after[("capstan_serving_requests_total", (("code", "400"),))] == 1
    assert after[("capstan_serving_errors_total", (("kind", "bad_request"),))] == 1
    assert after[("capstan_serving_request_latency_seconds_count", ())] == 2
    assert after[("capstan_serving_request_latency_seconds_bucket", (("le", "+Inf"),))] == 2
    assert after[("capstan_serving_time_to_first_token_seconds_count", ())] == 2
    assert after[("capstan_serving_time_per_output_token_seconds_count", ())] == generated - 2
    assert after[("capstan_serving_generated_tokens_total", ())] == generated
    assert after[("capstan_serving_requests_running", ())] == 0
    assert after[("capstan_serving_requests_waiting", ())] == 0


async def test_readyz_is_503_until_model_loaded(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = app_module.load_model_dir

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_model_dir", slow_load)
    async with serving(model_dir, wait_ready=False) as (url, _), aiohttp.ClientSession() as s:
        async with s.get(f"{url}/healthz") as r:
            assert r.status == 200
        async with s.get(f"{url}/readyz") as r:
            assert r.status == 503 and (await r.json())["status"] == "loading"
        status, body = await complete(s, url, prompt="the ")
        assert status == 503 and "not loaded" in body["error"]["message"]
        gate.set()

        async def ready() -> bool:
            async with s.get(f"{url}/readyz") as r:
                return r.status == 200

        await eventually(ready)
        assert (await complete(s, url, prompt="the ", max_tokens=3))[0] == 200


async def test_load_failure_reported_by_health(tmp_path: Path) -> None:
    async with serving(tmp_path, wait_ready=False) as (url, state), aiohttp.ClientSession() as s:

        async def failed() -> bool:
            return state.load_error is not None

        await eventually(failed)
        async with s.get(f"{url}/healthz") as r:
            assert r.status == 500 and "missing model.safetensors" in (await r.json())["error"]
        async with s.get(f"{url}/readyz") as r:
            assert r.status == 503


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "the ", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "the ", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x" * 64}, "prompt"),
        ({"max_tokens": 5}, "prompt"),
        ({"prompt": "the ", "temperature": -1}, "temperature"),
        ({"prompt": "the ", "top_p": 0}, "top_p"),
        ({"prompt": "the ", "stream": "yes"}, "stream"),
        ({"prompt": "the ", "seed": -3}, "seed"),
        ({"prompt": "the ", "n": 0}, "n"),
        ({"prompt": "the ", "n": 33}, "n"),  # more choices than the batch holds
        ({"prompt": "the ", "n": "2"}, "n"),
        ({"prompt": "the ", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "the ", "stop": [""]}, "stop"),
        ({"prompt": "the ", "stop": 3}, "stop"),
    ],
)
async def test_bad_input_is_400_naming_the_field(model_dir: Path, body: dict[str, Any], param: str) -> None:
    async with serving(model_dir) as (url, _), aiohttp.ClientSession() as s:
        status, resp = await complete(s, url, **body)
    assert status == 400
    assert resp["error"]["param"] == param and param in resp["error"]["message"]
    assert resp["error"]["type"] == "invalid_request_error"


USER = {"role": "user", "content": "the quick"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [USER, {"role": "wizard", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [USER], "n": 0}, "n"),
        ({"messages": [USER], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [USER], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x" * 70}]}, "messages"),
    ],
)
async def test_bad_chat_input_is_400_naming_the_field(
    model_dir: Path, body: dict[str, Any], param: str
) -> None:
    async with serving(model_dir) as (url, _), aiohttp.ClientSession() as s:
        status, resp = await chat(s, url, **body)
    assert status == 400, resp
    assert resp["error"]["param"] == param and param in resp["error"]["message"]


async def test_chat_is_a_completion_of_the_templated_conversation(model_dir: Path) -> None:
    messages = [
        {"role": "system", "content": "a capstan"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "the quick "}, {"type": "text", "text": "fox"}],
        },
    ]
    rendered = "system: a capstan\nuser: the quick fox\nassistant: "
    async with serving(model_dir) as (url, _), aiohttp.ClientSession() as s:
        (cs, cbody), (ps, pbody), events = await asyncio.gather(
            chat(s, url, messages=messages, max_tokens=12, temperature=0),
            complete(s, url, prompt=rendered, max_tokens=12, temperature=0),
            stream(
                s, url, "/v1/chat/completions", messages=messages, max_completion_tokens=12, temperature=0
            ),
        )
    assert cs == ps == 200
    assert cbody["object"] == "chat.completion" and cbody["id"].startswith("chatcmpl-")
    (choice,) = cbody["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == pbody["choices"][0]["text"]
    assert choice["finish_reason"] == "length" and cbody["usage"] == pbody["usage"]
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
    )
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["usage"] == cbody["usage"]


async def test_chat_template_from_the_model_dir_and_its_refusals(model_dir: Path, tmp_path: Path) -> None:
    custom = tmp_path / "model"
    custom.mkdir()
    for f in model_dir.iterdir():
        (custom / f.name).write_bytes(f.read_bytes())
    (custom / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'system' %}{{ raise_exception('start with a system message') }}{% endif %}"
        "{% for m in messages %}{{ m.content }} {% endfor %}"
    )
    async with serving(custom) as (url, _), aiohttp.ClientSession() as s:
        ok, body = await chat(s, url, messages=[{"role": "system", "content": "the"}, USER], temperature=0)
        assert ok == 200, body
        plain = await complete(s, url, prompt="the the quick ", temperature=0)
        assert body["choices"][0]["message"]["content"] == plain[1]["choices"][0]["text"]
        status, err = await chat(s, url, messages=[USER])
    assert status == 400 and err["error"]["param"] == "messages"
    assert "start with a system message" in err["error"]["message"]


async def test_broken_chat_template_fails_the_load(model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    async with serving(model_dir, wait_ready=False, chat_template=str(bad)) as (_, state):

        async def failed() -> bool:
            return state.load_error is not None

        await eventually(failed)
    assert state.load_error is not None and "chat template does not compile" in state.load_error


async def test_stop_cuts_before_the_stop_string_in_both_apis_and_streams(model_dir: Path) -> None:
    base = {"max_tokens": 40, "temperature": 0, "ignore_eos": True}
    async with serving(model_dir) as (url, state), aiohttp.ClientSession() as s:
        _, full = await complete(s, url, prompt="a capstan", **base)
        text = full["choices"][0]["text"]
        stop = text[12:15]
        want = text[: text.find(stop)]
        (_, cut), events, (_, listed) = await asyncio.gather(
            complete(s, url, prompt="a capstan", stop=stop, **base),
            stream(s, url, prompt="a capstan", stop=[stop], **base),
            complete(s, url, prompt="a capstan", stop=["no such text", stop], **base),
        )
        _, unmatched = await complete(s, url, prompt="a capstan", stop="no such text", **base)
        assert state.scheduler is not None
        used = state.scheduler.blocks.num_used
    assert cut["choices"][0] == {"index": 0, "text": want, "logprobs": None, "finish_reason": "stop"}
    assert cut["usage"]["completion_tokens"] < 40  # generation stopped there, not at max_tokens
    assert listed["choices"][0]["text"] == want
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == want
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert unmatched["choices"][0] == full["choices"][0]
    assert used == 0


async def test_n_choices_with_index_usage_and_streaming(model_dir: Path) -> None:
    req = {"prompt": "the ", "max_tokens": 20, "temperature": 1.0, "seed": 5, "n": 3, "ignore_eos": True}
    chat_req = {k: v for k, v in req.items() if k != "prompt"}
    async with serving(model_dir) as (url, state), aiohttp.ClientSession() as s:
        (status, body), events, (_, one) = await asyncio.gather(
            complete(s, url, **req),
            stream(s, url, "/v1/chat/completions", messages=[USER], **chat_req),
            complete(s, url, **{**req, "n": 1, "seed": 6}),
        )
        _, chat_body = await chat(s, url, messages=[USER], **chat_req)
        assert state.scheduler is not None
        used = state.scheduler.blocks.num_used
    assert status == 200
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 60, "total_tokens": 64}
    # Choice i of a seeded request is the seed + i of a single-choice request.
    assert choices[1]["text"] == one["choices"][0]["text"]
    assert len({c["text"] for c in choices}) > 1
    chunks = events[:-1]
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"]["role"] == "assistant" and mine[-1]["finish_reason"] is not None
        content = "".join(c["delta"].get("content", "") for c in mine)
        assert content == chat_body["choices"][i]["message"]["content"]
    assert sum(1 for c in chunks if "usage" in c) == 1 and "usage" in chunks[-1]
    assert used == 0


async def test_prefix_cache_hits_a_shared_system_prompt_and_changes_nothing(model_dir: Path) -> None:
    system = "continuous batching admits new requests into the"  # 48 tokens: three 16-token blocks
    questions = ["the quick", "a capstan", "paged kv"]

    async def answers(prefix_caching: bool) -> tuple[list[str], dict[Any, float]]:
        async with (
            serving(model_dir, prefix_caching=prefix_caching) as (url, _),
            aiohttp.ClientSession() as s,
        ):
            texts = []
            for q in questions:  # one after the other: each later one can hit the first's blocks
                _, body = await complete(s, url, prompt=system + q, max_tokens=10, temperature=0)
                texts.append(body["choices"][0]["text"])
            return texts, await metric_samples(s, url)

    (on, on_metrics), (off, off_metrics) = await answers(True), await answers(False)
    assert on == off
    prompt_tokens = sum(len(system + q) for q in questions)
    for m in (on_metrics, off_metrics):
        assert m[("capstan_serving_prompt_tokens_total", ())] == prompt_tokens
    assert on_metrics[("capstan_serving_prefix_cache_hit_tokens_total", ())] == 2 * 48
    assert off_metrics[("capstan_serving_prefix_cache_hit_tokens_total", ())] == 0


async def test_invalid_json_is_400(model_dir: Path) -> None:
    async with (
        serving(model_dir) as (url, _),
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v1/completions", data=b"{not json") as r,
    ):
        assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]


async def test_kv_blocks_all_freed_after_requests_and_disconnects(model_dir: Path) -> None:
    async with (
        serving(model_dir, max_batch_size=4, kv_block_tokens=4) as (url, state),
        aiohttp.ClientSession() as s,
    ):
        assert state.scheduler is not None
        alloc = state.scheduler.blocks
        await asyncio.gather(
            *(complete(s, url, prompt=p, max_tokens=20) for p in PROMPTS),
            *(stream(s, url, prompt=p, max_tokens=15) for p in PROMPTS[:3]),
        )
        # A client that hangs up mid-stream must not leak its blocks.
        async with s.post(
            f"{url}/v1/completions", json={"prompt": "the ", "max_tokens": 60, "stream": True}
        ) as r:
            await r.content.readline()
        samples: dict[Any, float] = {}

        async def freed() -> bool:
            nonlocal samples
            samples = await metric_samples(s, url)
            return (
                alloc.num_free == alloc.num_blocks
                and state.scheduler is not None
                and not state.scheduler.running
            )

        await eventually(freed)
    assert samples[("capstan_serving_kv_blocks_used", ())] == 0


async def test_models_endpoint_and_unknown_limit(model_dir: Path) -> None:
    async with serving(model_dir, model_name="tiny") as (url, _), aiohttp.ClientSession() as s:
        async with s.get(f"{url}/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "tiny"
        assert (await complete(s, url, prompt="", max_tokens=3))[0] == 200  # empty prompt -> <bos>
    with pytest.raises(TypeError, match="max_batch"):
        create_app(model_dir, max_batch=3)
