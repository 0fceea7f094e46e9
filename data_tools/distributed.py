"""Rank, world size and barriers of a multi-process data_tools run (`accelerate launch -m data_tools ...` or
torchrun); the process group only serves barriers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    barrier: Callable[[], None]
    device: str


def distributed_context(device: str) -> DistContext:
    """Rank and world size from the launcher's environment (RANK/WORLD_SIZE, set by `accelerate launch` and
    torchrun); the process group (nccl on GPUs, gloo on CPU) only serves barriers."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return DistContext(0, 1, lambda: None, device)

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend)

    def barrier() -> None:
        dist.barrier()

    return DistContext(rank, world, barrier, device)
