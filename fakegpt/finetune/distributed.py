"""Data-parallel helpers for `torchrun --nproc_per_node=N`: process group, rank info, small collectives.

Without torchrun (no RANK in the environment) everything degrades to one process and no collectives.
NCCL on CUDA, gloo on CPU (so CI can run two CPU processes).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


FAILED_KEY = "fakegpt/failed"  # in torchrun's store: "rank N: <one-line error>" of the first process that failed


class PeerWatch:
    """Under torchrun: when one process fails on its own (disk full while saving, out of memory), the others exit
    within seconds instead of waiting in their next collective until the process group's timeout (30 minutes;
    NCCL does not notice a dead peer, and torchrun's SIGTERM is not handled while a rank is blocked in C++).

    The failing process writes one key to torchrun's rendezvous store (`fail`); a daemon thread in every process
    polls that key every `interval` seconds and, when another rank wrote it, runs `on_peer_failure` (rank 0: mark
    the MLflow run FAILED), prints one line and exits the process. A no-op in a single process."""

    def __init__(self, info: Dist, interval: float = 1.0):
        self.info = info
        self.interval = interval
        self.on_peer_failure: Callable[[str], None] | None = None
        self._store: dist.Store | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeerWatch:
        if self.info.world_size > 1 and "MASTER_ADDR" in os.environ:
            # A client of the store torchrun already serves (its agent's, or rank 0's): no new server.
            self._store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=datetime.timedelta(seconds=30),
            )
            self._thread = threading.Thread(target=self._watch, name="fakegpt-peer-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def fail(self, message: str) -> None:
        """Tell the other processes that this one failed (first writer wins; never raises)."""
        if self._store is None:
            return
        with contextlib.suppress(Exception):
            self._store.compare_set(FAILED_KEY, "", f"rank {self.info.rank}: {message}")

    def peer_failure(self, wait: float = 0.0) -> str | None:
        """Another rank's failure message, waiting up to `wait` seconds for it to arrive; None if there is none."""
        if self._store is None:
            return None
        deadline = time.monotonic() + wait
        while True:
            with contextlib.suppress(Exception):
                if self._store.check([FAILED_KEY]):
                    message = self._store.get(FAILED_KEY).decode()
                    return None if message.startswith(f"rank {self.info.rank}:") else message
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                message = self.peer_failure()
            except Exception:  # the store went away: torchrun is tearing the job down anyway
                return
            if message is None or self._stop.is_set():
                continue
            if self.on_peer_failure is not None:
                with contextlib.suppress(Exception):
                    self.on_peer_failure(message)
            print(f"fakegpt finetune: error: rank {self.info.rank} stopped: {message}", file=sys.stderr, flush=True)
            os._exit(1)  # the main thread may be blocked in a collective that never returns
