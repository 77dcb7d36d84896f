"""Data-parallel helpers for `torchrun --nproc_per_node=N`: process group, rank info, small collectives.

Without torchrun (no RANK in the environment) everything degrades to one process and no collectives.
NCCL on CUDA, gloo on CPU (so CI can run two CPU processes).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun: rank, local rank (its GPU) and world size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        """Only the main process logs to MLflow, prints progress and writes checkpoints."""
        return self.rank == 0


def from_env() -> Dist:
    """The torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE), or a single process."""
    if "RANK" not in os.environ:
        return Dist()
    return Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def setup(info: Dist, device: torch.device) -> None:
    """Join the process group torchrun describes (idempotent)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def teardown() -> None:
    """Destroy the process group, if this process started one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(info: Dist, device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its local rank (unless a GPU index was given)."""
    if info.world_size > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", info.local_rank)
    return device


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a short list of floats over all processes (identity in one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's flag on every rank: lets rank 0 stop all processes together (callback, NaN)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())
