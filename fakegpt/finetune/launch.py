"""`fakegpt finetune --nproc-per-node N`: the fine-tune on N processes (GPUs) without typing `torchrun`.

`mlflow run -e finetune` and a series' cells (`mixture --gpus-per-cell N`) start `python -m fakegpt finetune`;
there is no place to put `torchrun` in front of it. With N > 1 that process becomes torchrun's launcher instead:
PyTorch's own elastic agent (`torch.distributed.run`, the module behind the `torchrun` command) in standalone
mode (one machine, a free port) starts the N processes over the same arguments and supervises them; nothing
of it is re-implemented here. The processes inherit the environment, so under `mlflow run` rank 0 logs into the
run that `mlflow run` started (MLFLOW_RUN_ID), as it does under a hand-typed torchrun.

A failed rank has already printed its own one-line error; the launcher then says which ranks failed, in one
line, instead of the agent's traceback.
"""

from __future__ import annotations

import logging
import os

from fakegpt.errors import FakegptError

log = logging.getLogger(__name__)


def under_torchrun() -> bool:
    """True in a process that torchrun (or this launcher) started: its place is in RANK/WORLD_SIZE."""
    return "RANK" in os.environ


def run(nproc: int, accumulation: int, argv: list[str]) -> int:
    """Run `fakegpt finetune argv` on `nproc` processes under torchrun's agent; 0 when every rank finished.
    `accumulation`: the run's gradient accumulation steps, split across the processes (checked before any
    process starts, so the error is said once, not by every rank)."""
    if accumulation % nproc:
        raise FakegptError(
            f"--gradient-accumulation-steps {accumulation} must be a multiple of --nproc-per-node {nproc}: the "
            "accumulation steps are split across the processes"
        )
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "fakegpt", "finetune", *argv])
    log.info("finetune: %d processes under torchrun (standalone)", nproc)
    try:
        torchrun(args)
    except ChildFailedError as exc:
        failed = sorted(exc.failures.items())
        codes = ", ".join(f"rank {rank} exit status {failure.exitcode}" for rank, failure in failed)
        raise FakegptError(f"--nproc-per-node {nproc}: {len(failed)} of {nproc} processes failed ({codes})") from None
    return 0
