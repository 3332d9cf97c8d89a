"""Training on several processes: torchrun starts them, PyTorch's process group joins them.

openldm does not start or watch processes itself. Under ``torchrun --nproc_per_node N [--nnodes M]``
each process finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its environment; :func:`join` then
opens the default process group (gloo on the CPU, nccl on CUDA). The training loop wraps what it
trains in ``DistributedDataParallel``, gives each rank its rows of every global batch, and lets rank 0
alone write files while the others wait at a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 when alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def main_first(self, work: Callable[[], T]) -> T | None:
        """Run ``work`` on rank 0 while the other ranks wait; its result on rank 0, None elsewhere."""
        result = work() if self.is_main else None
        self.barrier()
        return result

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on some rank (every rank gets the same answer)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the ranks (a detached float copy, on the CPU)."""
        value = value.detach().float().cpu().clone()
        if self.distributed:
            dist.all_reduce(value)
        return value


ALONE = Ranks()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def join(device: torch.device) -> Ranks:
    """This process's :class:`Ranks`: :data:`ALONE` outside torchrun, else the joined process group's
    (gloo for CPU devices, nccl for CUDA; on CUDA each process takes the GPU of its ``LOCAL_RANK``)."""
    if not launched_by_torchrun():
        return ALONE
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world == 1:
        return ALONE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return Ranks(rank, world, local_rank)


def device_for(requested: torch.device) -> torch.device:
    """Under torchrun on CUDA, this process's GPU (``cuda:LOCAL_RANK``); else ``requested``."""
    if requested.type == "cuda" and launched_by_torchrun() and requested.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return requested


def leave(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
