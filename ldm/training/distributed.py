"""Data-parallel training under `torchrun`: which rank this process is, and the few collectives the loops need.

    torchrun --nproc-per-node 4 -m flows.train_unet          # one node, 4 GPUs (NCCL) or 4 CPU processes (gloo)

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; `data_parallel(device)` joins the
process group from them (NCCL when the device is CUDA, each rank on the GPU of its LOCAL_RANK; gloo on the
CPU) and leaves it at the end. A plain `python -m ...` is a world of one: every method below is then a no-op,
so the training loops run the same code either way.

Each rank computes its share of every global batch and DDP averages the gradients, so a step is the step one
process takes on the whole batch. Only rank 0 writes checkpoints, logs and models; every rank resumes from
the checkpoint rank 0 picks, which therefore has to be on storage all ranks see.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldm.errors import InputError


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks of a data-parallel run (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The rank that writes checkpoints, models and logs."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        """The suffix ' (rank r of n)' of a stage's log lines in a data-parallel run; empty in a single process."""
        return f" (rank {self.rank} of {self.world_size})" if self.enabled else ""

    def share(self, total: int, what: str) -> slice:
        """This rank's contiguous part of `total` rows of a global batch; `total` must split evenly."""
        if total % self.world_size:
            raise InputError(
                f"{what} of {total} does not split evenly over {self.world_size} ranks; make it a multiple of "
                f"{self.world_size} or run on a number of ranks that divides it"
            )
        size = total // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def wrap(self, module: nn.Module) -> nn.Module:
        """The module whose backward averages gradients over the ranks (DDP), or the module itself."""
        if not self.enabled:
            return module
        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the ranks (a new tensor; the same on every rank)."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def max(self, value: int) -> int:
        """The largest of the ranks' `value`s: a decision every rank then takes together."""
        if not self.enabled:
            return value
        # NCCL reduces only tensors on the rank's GPU; gloo only CPU ones.
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        found = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(found, op=dist.ReduceOp.MAX)
        return int(found.item())

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (any picklable value: it only travels between the run's own ranks)."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, values: Sequence[Any]) -> list[Any]:
        """Every rank's `values`, concatenated in rank order, on every rank."""
        if not self.enabled:
            return list(values)
        parts: list[list[Any]] = [[] for _ in range(self.world_size)]
        dist.all_gather_object(parts, list(values))
        return [value for part in parts for value in part]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE_PROCESS = DataParallel()


def launched_rank() -> int:
    """The RANK torchrun gave this process (0 without torchrun), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def data_parallel(device: torch.device) -> Iterator[tuple[DataParallel, torch.device]]:
    """Join the process group torchrun describes (if any) for the block: (this rank, the device it trains on).

    A CUDA `device` becomes the GPU of this rank's LOCAL_RANK: a node's ranks share its GPUs one each.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE_PROCESS, device
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield DataParallel(dist.get_rank(), dist.get_world_size()), device
    finally:
        dist.destroy_process_group()
