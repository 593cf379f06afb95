"""Prometheus metrics of the trainer (rank 0 only), all prefixed ``capstan_train_``."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("capstan.train")

_SAVE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class TrainMetrics:
    """The trainer's gauges, counters and histograms in their own registry (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.step = Gauge("capstan_train_step", "Last completed optimizer step.", registry=r)
        self.loss = Gauge("capstan_train_loss", "Loss of the last step (mean over ranks).", registry=r)
        self.tokens_per_second = Gauge(
            "capstan_train_tokens_per_second", "Training throughput of the last step, all ranks.", registry=r
        )
        self.tokens = Counter("capstan_train_tokens", "Tokens trained on, all ranks.", registry=r)
        self.step_seconds = Histogram(
            "capstan_train_step_seconds", "Wall time of one optimizer step.", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.checkpoint_save_seconds = Histogram(
            "capstan_train_checkpoint_save_seconds",
            "Time from starting a checkpoint to its durable commit (mostly in the background).",
            registry=r, buckets=_SAVE_BUCKETS,
        )
        self.checkpoint_stall_seconds = Histogram(
            "capstan_train_checkpoint_stall_seconds",
            "Time training was blocked by a checkpoint (host copy, waiting for the previous save).",
            registry=r, buckets=_SAVE_BUCKETS,
        )
        self.checkpoints = Counter("capstan_train_checkpoints", "Checkpoints committed.", registry=r)
        self.checkpoint_step = Gauge(
            "capstan_train_checkpoint_step", "Step of the newest committed checkpoint (-1: none yet).",
            registry=r,
        )
        self.checkpoint_step.set(-1)
        self.checkpoint_timestamp = Gauge(
            "capstan_train_checkpoint_timestamp_seconds", "Unix time the newest checkpoint was committed.",
            registry=r,
        )
        self.resumed_from_step = Gauge(
            "capstan_train_resumed_from_step", "Step this gang resumed from (-1: a fresh start).", registry=r
        )
        self.resumed_from_step.set(-1)
        self.checkpoint_request = Gauge(
            "capstan_train_checkpoint_request",
            "Last checkpoint request of the operator answered with a committed checkpoint (0: none).",
            registry=r,
        )

    def serve(self, port: int) -> bool:
        """Expose the registry on ``port`` (0 disables); False, with a warning, when it cannot bind."""
        if port == 0:
            return False
        try:
            start_http_server(port, registry=self.registry)
        except OSError as e:  # a busy port must not kill a training run
            log.warning("metrics disabled: cannot listen on port %d (%s)", port, e)
            return False
        log.info("metrics on http://0.0.0.0:%d/metrics", port)
        return True

    def committed(self, step: int, seconds: float) -> None:
        """Record a checkpoint commit (called from the checkpoint thread)."""
        self.checkpoints.inc()
        self.checkpoint_step.set(step)
        self.checkpoint_timestamp.set(time.time())
        self.checkpoint_save_seconds.observe(seconds)
