"""DistributedDataParallel under torchrun: which process this is, and the few collectives the loop needs.

`torchrun --nproc-per-node N -m pgshell --ddp plan.txt` starts N copies of pgshell running the same plan. Each
process trains on its shard of every global batch (EpochSampler's rank/world), gradients are averaged by DDP, and
rank 0 alone writes checkpoints, metrics and output. Multi-node works through torchrun's rendezvous
(`--nnodes`, `--rdzv-endpoint`), with the session folder on a filesystem every node sees.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PgError

if TYPE_CHECKING:
    import torch

# torch is imported where a collective runs, not here: the session asks `world().main` before every file it writes,
# and a plan of just `quit` must not pay torch's import (seconds) for that question.


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0  # the global rank: on several nodes every node has a LOCAL_RANK 0

    @property
    def active(self) -> bool:
        return self.size > 1


_world = World()


def world() -> World:
    return _world


def init_from_env() -> World:
    """Join the process group torchrun set up (env:// rendezvous); gloo on CPU, nccl on GPUs."""
    global _world
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PgError("--ddp runs under torchrun: `torchrun --nproc-per-node N -m pgshell --ddp plan.txt`")
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if backend == "gloo":  # share the cores instead of every process claiming all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    _world = World(rank, size, local)
    return _world


def shutdown() -> None:
    global _world
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _world = World()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over all processes (one small all_reduce)."""
    if not _world.active:
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def agree(request: str | None, device: torch.device) -> str | None:
    """Every process must pause or stop at the same batch: the strongest request of any process wins."""
    if not _world.active:
        return request
    import torch
    import torch.distributed as dist

    code = {None: 0, "pause": 1, "stop": 2}[request]
    t = torch.tensor([code], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {0: None, 1: "pause", 2: "stop"}[int(t.item())]
