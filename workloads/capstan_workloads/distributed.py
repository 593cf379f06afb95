"""Process-group setup and model wrapping (DDP or FSDP2) for workers started by torchrun."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from .model import GPT


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the gang."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float) -> DistEnv:
    """Join the gang: NCCL for CUDA tensors (gloo for CPU ones), gloo alone on CPU-only hosts."""
    local_rank = int(os.environ["LOCAL_RANK"])
    timeout = timedelta(seconds=timeout_s)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # The CPU backend serves the small CPU collectives (checkpoint planning, flags).
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timeout, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def wrap_model(model: GPT, strategy: str, env: DistEnv) -> nn.Module:
    """DDP (replicated) or FSDP2 (``fully_shard`` per block, then the root) around ``model``."""
    if strategy == "ddp":
        return DDP(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if strategy == "fsdp":
        # Sharding each block lets FSDP all-gather one block at a time: peak memory ~ one block.
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    raise ValueError(f"unknown strategy {strategy!r}")


def unwrap(model: nn.Module) -> GPT:
    """The GPT inside a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    inner = model.module if isinstance(model, DDP) else model
    assert isinstance(inner, GPT)
    return inner


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one syncs."""
    if isinstance(model, DDP) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def agree_any(flag: bool, value: float, device: torch.device) -> tuple[bool, float]:
    """One all-reduce that returns (any rank set ``flag``, mean of ``value`` over ranks).

    Folding the stop flag into the loss reduction means a SIGTERM seen by one node stops every rank
    at the same step, for the price of a collective that logging needs anyway.
    """
    t = torch.tensor([float(flag), value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    flag_sum, value_sum = t.tolist()
    return flag_sum > 0, value_sum / dist.get_world_size()


def agree_step(flag: bool, value: float, extra: float, device: torch.device) -> tuple[bool, float, float]:
    """:func:`agree_any`, plus the sum of ``extra`` over ranks (rank 0's alone when the others pass 0)."""
    t = torch.tensor([float(flag), value, extra], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    flag_sum, value_sum, extra_sum = t.tolist()
    return flag_sum > 0, value_sum / dist.get_world_size(), extra_sum


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
