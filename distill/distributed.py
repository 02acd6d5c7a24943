"""torchrun integration: who am I, how many are we, and which device is mine."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import DistillError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """Round-robin share of ``items`` for this rank: every item on exactly one rank."""
        return items[self.rank::self.size]

    def barrier(self) -> None:
        if self.size > 1:
            torch.distributed.barrier()


def world_from_env() -> World:
    """Read torchrun's variables; a plain process is rank 0 of 1."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, world: World | None = None) -> torch.device:
    world = world or World()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DistillError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu.")
        return torch.device("cuda", world.local_rank % torch.cuda.device_count())
    if name == "cpu":
        return torch.device("cpu")
    raise DistillError(f"Unknown device {name!r}; use auto, cpu or cuda.")


def init_process_group(world: World, device: torch.device) -> None:
    """Join the torchrun group (NCCL on GPUs, gloo on CPUs); a no-op for a single process."""
    if world.size <= 1 or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend=backend)


def destroy_process_group(world: World) -> None:
    if world.size > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
