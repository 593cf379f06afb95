"""Continuous batching: a worker thread that admits, prefills, decodes and retires sequences.

Every iteration (one "step"):
1. admit waiting requests in FIFO order while the batch has room and the KV pool has the blocks
   the request can ever need (reserved up front, so a running sequence never has to be preempted);
2. prefill the newly admitted prompts in one batched forward (their first token comes out here);
3. decode one token for every running sequence in ONE batched forward;
4. retire sequences that hit EOS, max_tokens or block_size, freeing their blocks at once.
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

from .engine import Engine, SamplingParams
from .metrics import ServingMetrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; the caller should answer 429."""


@dataclass
class TokenEvent:
    """One generated token, delivered to the request's consumer."""

    token_id: int
    text: str


@dataclass
class FinishEvent:
    """The sequence left the batch; ``reason`` is ``stop``, ``length``, ``abort`` or ``error``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TokenEvent | FinishEvent
_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    """A request's state inside the scheduler. ``emit`` must be thread-safe (called from the worker)."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.monotonic)
    last_token_at: float | None = None
    cancelled: bool = False  # set from the HTTP side when the client goes away

    @property
    def length(self) -> int:
        """Tokens so far, prompt included."""
        return len(self.prompt) + len(self.output)


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
        self.block_size = engine.cfg.block_size
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        # Bounds a step's prefill so running sequences are not stalled by a burst of long prompts.
        self.max_prefill_tokens = max_prefill_tokens
        self.threads = threads
        self.waiting: deque[Sequence] = deque()
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

    # ---- called from the HTTP side -------------------------------------------------------

    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        """KV blocks a request can ever use: every token fed to the model (the last sampled one is not)."""
        total = min(prompt_len + max_tokens, self.block_size)
        return self.cache.blocks_for(max(prompt_len, total - 1))

    def submit(self, prompt: list[int], params: SamplingParams, emit: Callable[[Event], None]) -> Sequence:
        """Queue a request; raise :class:`QueueFull` rather than queueing without bound."""
        seq = Sequence(prompt=prompt, params=params, emit=emit)
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        elif params.temperature > 0:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source).item())
            seq.generator = torch.Generator().manual_seed(seed)
        with self._cond:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests already waiting")
            self.waiting.append(seq)
            self.metrics.requests_waiting.set(len(self.waiting))
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Ask the worker to drop a sequence at its next step (client disconnected)."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    @property
    def num_inflight(self) -> int:
        """Requests waiting or running."""
        with self._cond:
            return len(self.waiting) + len(self.running)

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
            leftovers = list(self.waiting) + self.running
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
        """One scheduler iteration: admit + prefill new sequences, decode the batch, retire."""
        self._drop_cancelled()
        admitted = self._admit()
        self.steps += 1
        self.peak_batch = max(self.peak_batch, len(self.running))
        if admitted:
            logits = self.engine.prefill([s.prompt for s in admitted], [s.blocks for s in admitted])
            self._append_tokens(admitted, logits)
        # Sequences admitted this step already got a token from prefill; decode the rest now so
        # a burst of arrivals costs the running batch one prefill, not a stall.
        fresh = {s.id for s in admitted}
        decoding = [s for s in self.running if s.id not in fresh]
        if decoding:
            logits = self.engine.decode(
                [s.output[-1] for s in decoding],
                [s.length - 1 for s in decoding],
                [s.blocks for s in decoding],
            )
            self._append_tokens(decoding, logits)
        self._update_gauges()

    def _drop_cancelled(self) -> None:
        kept = []
        for seq in self.running:
            if seq.cancelled:
                self._finish(seq, "abort")
            else:
                kept.append(seq)
        self.running = kept

    def _admit(self) -> list[Sequence]:
        admitted: list[Sequence] = []
        budget = self.max_prefill_tokens
        with self._cond:
            while self.waiting and len(self.running) < self.max_batch_size:
                seq = self.waiting[0]
                if seq.cancelled:
                    self.waiting.popleft()
                    self._finish(seq, "abort")
                    continue
                need = self.blocks_needed(len(seq.prompt), seq.params.max_tokens)
                # FIFO: the head waits for blocks/budget rather than being overtaken (no starvation).
                if need > self.cache.allocator.num_free or (admitted and len(seq.prompt) > budget):
                    break
                self.waiting.popleft()
                seq.blocks = self.cache.allocator.allocate(need)
                budget -= len(seq.prompt)
                admitted.append(seq)
                self.running.append(seq)
        return admitted

    def _append_tokens(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = self.engine.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        now = time.monotonic()
        eos = self.tokenizer.eos_id
        for seq, tok in zip(seqs, tokens, strict=True):
            if seq.last_token_at is None:
                self.metrics.time_to_first_token.observe(now - seq.arrival)
            else:
                self.metrics.time_per_output_token.observe(now - seq.last_token_at)
            seq.last_token_at = now
            seq.output.append(tok)
            # Count before emitting: a client that scrapes /metrics right after its answer must
            # see every token of it.
            self.metrics.generated_tokens.inc()
            seq.emit(TokenEvent(tok, self.tokenizer.decode([tok])))
            if tok == eos and not seq.params.ignore_eos:
                self._retire(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.block_size:
                self._retire(seq, "length")

    def _retire(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.blocks:
            self.cache.allocator.free(seq.blocks)
            seq.blocks = []
        # Gauges first: a client that reads /metrics right after its answer must see itself gone.
        self._update_gauges()
        seq.emit(FinishEvent(reason, len(seq.prompt), len(seq.output), error))

    def _update_gauges(self) -> None:
        m = self.metrics
        m.requests_running.set(len(self.running))
        m.requests_waiting.set(len(self.waiting))
        m.kv_blocks_used.set(self.cache.allocator.num_used)
