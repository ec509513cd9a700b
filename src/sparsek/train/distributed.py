"""Data-parallel training under torchrun: the process group, and averages across processes.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them everything here is a no-op for one process.
The backend is NCCL on CUDA and gloo on CPU (which is how CI tests two processes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> World:
    """Join the process group torchrun describes (if any); device_kind "cuda" or "cpu" picks the backend."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), size)
    if size > 1 and not dist.is_initialized():
        if device_kind == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return world


def mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """The average of a tensor over all processes (itself for one process)."""
    if world.size > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world.size
    return value


def any_true(flag: bool, world: World, device: torch.device) -> bool:
    """True on every process if `flag` is true on any (so all stop at the same step)."""
    if world.size == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return bool(value.item())


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def teardown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
