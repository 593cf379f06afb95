"""Continuous batching: a worker thread that admits, prefills, decodes and retires sequences.

Every iteration (one "step"):
1. admit waiting requests in FIFO order while the batch has room and the KV pool has the blocks
   the request can ever need (reserved up front, so a running sequence never has to be preempted);
   a prompt whose leading blocks are in the prefix cache takes references on them instead;
2. prefill the newly admitted prompts (only their uncached tokens) in one batched forward; a
   request's ``n`` choices share the prompt's blocks and each samples its first token here;
3. decode one token for every running sequence in ONE batched forward (a choice about to write
   into a block it still shares copies it first: copy-on-write);
4. retire sequences that hit EOS, a stop string, max_tokens or block_size, releasing their blocks.
New requests therefore join the batch at the next step instead of waiting for the batch to end.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from capstan_workloads.tokenizer import Tokenizer

from .adapters import Adapter
from .blocks import BlockTable
from .engine import Engine, SamplingParams
from .metrics import ServingMetrics
from .stops import StopText

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the caller should answer 429."""


@dataclass
class TokenEvent:
    """One generated token of choice ``index``; ``text`` is what may be streamed now (may be empty)."""

    index: int
    token_id: int
    text: str


@dataclass
class FinishEvent:
    """Choice ``index`` left the batch; ``reason`` is ``stop``, ``length``, ``abort`` or ``error``.

    ``text``: the choice's whole output (cut before a stop string); ``tail``: the part of it no
    :class:`TokenEvent` carried yet.
    """

    index: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    text: str = ""
    tail: str = ""
    error: str | None = None


Event = TokenEvent | FinishEvent
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """A submitted prompt and its ``params.n`` choices. ``emit`` must be thread-safe (worker thread)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    seqs: list[Sequence] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.monotonic)
    cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    cancelled: bool = False  # set from the HTTP side when the client goes away
    adapter: Adapter | None = None  # the LoRA adapter the request picked by model name (None: base)


@dataclass(eq=False)
class Sequence:
    """One choice of a request inside the scheduler."""

    request: Request
    index: int
    stop: StopText
    output: list[int] = field(default_factory=list)
    table: BlockTable | None = None
    generator: torch.Generator | None = None
    last_token_at: float | None = None
    finished: bool = False

    @property
    def prompt(self) -> list[int]:
        """The request's prompt (shared by its choices)."""
        return self.request.prompt

    @property
    def params(self) -> SamplingParams:
        """The request's sampling parameters."""
        return self.request.params

    @property
    def length(self) -> int:
        """Tokens so far, prompt included."""
        return len(self.request.prompt) + len(self.output)

    @property
    def blocks(self) -> list[int]:
        """The block table's block ids (empty once finished)."""
        return self.table.blocks if self.table else []


class Scheduler:
    """Owns the engine and its KV cache; only the worker thread touches them."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        metrics: ServingMetrics,
        *,
        max_batch_size: int = 32,
        max_waiting: int = 256,
        max_prefill_tokens: int = 4096,
        threads: int | None = None,
    ) -> None:
        self.engine = engine
        self.cache = engine.cache
        self.blocks = engine.cache.manager
        self.block_size = engine.cfg.block_size
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        # Bounds a step's prefill so running sequences are not stalled by a burst of long prompts.
        self.max_prefill_tokens = max_prefill_tokens
        self.threads = threads
        self.waiting: deque[Request] = deque()
        self.running: list[Sequence] = []
        self._cond = threading.Condition()
        self._stop = False
        # Observability for tests and benchmarks: how many steps ran and the largest batch seen.
        self.steps = 0
        self.peak_batch = 0
        self._thread: threading.Thread | None = None
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns() % 2**63))
        metrics.kv_blocks_total.set(self.cache.num_blocks)
        metrics.kv_blocks_used.set(0)
        metrics.kv_cache_usage.set(0)

    # ---- called from the HTTP side -------------------------------------------------------

    def fed_tokens(self, prompt_len: int, max_tokens: int) -> int:
        """Positions a choice can ever write to the KV cache: every token fed to the model.

        The last sampled token is never fed back, and nothing goes past the model's block_size.
        """
        return max(prompt_len, min(prompt_len + max_tokens, self.block_size) - 1)

    def blocks_needed(self, prompt_len: int, max_tokens: int, n: int = 1) -> int:
        """KV blocks a request of ``n`` choices can ever use, with no prefix cache hit."""
        return self.blocks.group_need(prompt_len, n, self.fed_tokens(prompt_len, max_tokens))

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        emit: Callable[[Event], None],
        adapter: Adapter | None = None,
    ) -> Request:
        """Queue a request (on the base, or through ``adapter``); raise :class:`QueueFull` rather than
        queueing without bound."""
        req = Request(prompt=prompt, params=params, emit=emit, adapter=adapter)
        for i in range(params.n):
            seq = Sequence(request=req, index=i, stop=StopText(params.stop))
            if params.seed is not None:
                # Choice i of a seeded request is reproducible on its own: seed + i.
                seq.generator = torch.Generator().manual_seed(params.seed + i)
            elif params.temperature > 0:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source).item())
                seq.generator = torch.Generator().manual_seed(seed)
            req.seqs.append(seq)
        with self._cond:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already waiting")
            self.waiting.append(req)
            self.metrics.requests_waiting.set(len(self.waiting))
            self._cond.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Ask the worker to drop a request's choices at its next step (client disconnected)."""
        req.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def num_inflight(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return len(self.waiting) + len({s.request.id for s in self.running})

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._loop, name="capstan-scheduler", daemon=True)
        self._thread.start()

    def stop(self, abort_reason: str = "abort") -> None:
        """Stop the worker and finish every remaining sequence with ``abort_reason``."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            leftovers = [s for r in self.waiting for s in r.seqs] + self.running
            self.waiting.clear()
        for seq in leftovers:
            self._finish(seq, abort_reason)
        self.running = []
        self._update_gauges()

    # ---- worker thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stop and not self.waiting and not self.running:
                        self._cond.wait()
                    if self._stop:
                        return
                try:
                    self.step()
                except Exception as exc:  # keep serving: fail the batch, not the process
                    log.exception("engine step failed")
                    self.metrics.errors.labels(kind="engine").inc()
                    for seq in self.running:
                        self._finish(seq, "error", error=str(exc))
                    self.running = []
                    self._update_gauges()

    def step(self) -> None:
        """One scheduler iteration: admit + prefill new requests, decode the batch, retire."""
        self._drop_cancelled()
        admitted = self._admit()
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(self.running))
        fresh: list[Sequence] = []
        if admitted:
            logits = self.engine.prefill(
                [r.prompt for r in admitted],
                [r.cached_tokens for r in admitted],
                [r.seqs[0].blocks for r in admitted],
                [r.adapter for r in admitted],
            )
            for req in admitted:
                for seq in req.seqs:
                    assert seq.table is not None
                    self.blocks.commit(seq.table, req.prompt)
                fresh += req.seqs
            # Each choice samples its first token from its request's prompt logits.
            counts = torch.tensor([r.params.n for r in admitted], device=logits.device)
            self._append_tokens(fresh, logits.repeat_interleave(counts, dim=0))
        # Sequences admitted this step already got a token from prefill; decode the rest now so
        # a burst of arrivals costs the running batch one prefill, not a stall.
        fresh_ids = {id(s) for s in fresh}
        decoding = [s for s in self.running if id(s) not in fresh_ids]
        if decoding:
            copies = []
            for seq in decoding:
                assert seq.table is not None
                copy = self.blocks.prepare_write(seq.table, seq.length - 1)
                if copy is not None:
                    copies.append(copy)
            self.cache.copy(copies)
            logits = self.engine.decode(
                [s.output[-1] for s in decoding],
                [s.length - 1 for s in decoding],
                [s.blocks for s in decoding],
                [s.request.adapter for s in decoding],
            )
            bt = self.cache.block_tokens
            for seq in decoding:
                assert seq.table is not None
                if seq.length // bt > len(seq.table.hashes):  # a block just became full
                    self.blocks.commit(seq.table, seq.prompt + seq.output)
            self._append_tokens(decoding, logits)
        self._update_gauges()

    def _drop_cancelled(self) -> None:
        kept = []
        for seq in self.running:
            if seq.request.cancelled:
                self._finish(seq, "abort")
            else:
                kept.append(seq)
        self.running = kept

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        budget = self.max_prefill_tokens
        with self._cond:
            while self.waiting and len(self.running) + self.waiting[0].params.n <= self.max_batch_size:
                req = self.waiting[0]
                if req.cancelled:
                    self.waiting.popleft()
                    for seq in req.seqs:
                        self._finish(seq, "abort")
                    continue
                # FIFO: the head waits for blocks/budget rather than being overtaken (no starvation).
                if admitted and len(req.prompt) > budget:
                    break
                fed = self.fed_tokens(len(req.prompt), req.params.max_tokens)
                salt = req.adapter.salt if req.adapter else b""
                tables = self.blocks.admit(req.prompt, req.params.n, fed, salt)
                if tables is None:
                    break
                self.waiting.popleft()
                for seq, table in zip(req.seqs, tables, strict=True):
                    seq.table = table
                req.cached_tokens = tables[0].cached_tokens
                self.metrics.prompt_tokens.inc(len(req.prompt))
                self.metrics.prefix_cache_hit_tokens.inc(req.cached_tokens)
                budget -= len(req.prompt) - req.cached_tokens
                admitted.append(req)
                self.running.extend(req.seqs)
        return admitted

    def _append_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = self.engine.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        eos = self.tokenizer.eos_id
        for seq, tok in zip(seqs, tokens, strict=True):
            if seq.last_token_at is None:
                if seq.index == 0:  # one first token per request
                    self.metrics.time_to_first_token.observe(now - seq.request.arrival)
            else:
                self.metrics.time_per_output_token.observe(now - seq.last_token_at)
            seq.last_token_at = now
            seq.output.append(tok)
            # Count before emitting: a client that scrapes /metrics right after its answer must
            # see every token of it.
            self.metrics.generated_tokens.inc()
            text = seq.stop.append(self.tokenizer.decode([tok]))
            seq.request.emit(TokenEvent(seq.index, tok, text))
            if (tok == eos and not seq.params.ignore_eos) or seq.stop.stopped:
                self._retire(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.block_size:
                self._retire(seq, "length")

    def _retire(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.table is not None:
            self.blocks.free(seq.table)
            seq.table = None
        # Gauges first: a client that reads /metrics right after its answer must see itself gone.
        self._update_gauges()
        tail = seq.stop.flush()
        seq.request.emit(
            FinishEvent(seq.index, reason, len(seq.prompt), len(seq.output), seq.stop.text, tail, error)
        )

    def _update_gauges(self) -> None:
        m = self.metrics
        m.requests_running.set(len(self.running))
        m.requests_waiting.set(len(self.waiting))
        m.kv_blocks_used.set(self.blocks.num_used)
        m.kv_cache_usage.set(self.blocks.num_used / max(1, self.cache.num_blocks))
