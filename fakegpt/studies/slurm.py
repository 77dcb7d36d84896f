"""`fakegpt mixture --storage URL --slurm-array N`: the shared series' workers as one SLURM job array (submitit).

Each array task runs the same series as a worker of `--storage` (fakegpt/studies/shared_cells.py), so the
array needs no scheduler of its own: tasks claim cells from the shared study, take over a dead task's cell,
and the last one builds the report. submitit writes the sbatch script, pickles the call, and keeps each task's
log and result under its folder; `--slurm-cluster local` runs the same tasks as processes on this machine
(waited for), which is how the array is tried without a cluster. A flag of `fakegpt mixture` rather than a
script of its own, so the array's settings are the series' settings, checked by the same validation before
anything is submitted.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from fakegpt.errors import FakegptError, one_line
from fakegpt.studies.main import PROJECT_DIR

log = logging.getLogger(__name__)


def parse_options(text: str) -> dict[str, Any]:
    """`slurm_partition=gpu,gpus_per_node=1,timeout_min=720` -> submitit's executor parameters (numbers as
    numbers)."""
    options: dict[str, Any] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FakegptError(f"--slurm-options: expected key=value, got {item!r}")
        value = value.strip()
        for kind in (int, float):
            try:
                options[key.strip()] = kind(value)
                break
            except ValueError:
                continue
        else:
            options[key.strip()] = value
    return options


def folder(cfg: Any) -> Path:
    """submitit's folder for the series (sbatch scripts, pickled calls, each task's log and result)."""
    return (
        Path(cfg.slurm_folder)
        if cfg.slurm_folder
        else PROJECT_DIR / cfg.out_root / "slurm" / f"mixture-{cfg.series_name}"
    )


def array_task(cfg: Any) -> list[dict[str, Any]]:
    """One array task: a worker of the shared series (what `fakegpt mixture --storage URL` runs)."""
    from fakegpt.studies.mixture import mixture

    return mixture(cfg)


def executor(cfg: Any) -> Any:
    """A submitit executor for the array (SLURM, or local processes), with the series' options."""
    try:
        import submitit
    except ImportError:
        raise FakegptError("--slurm-array: submitit is not installed (`pip install 'fakegpt[slurm]'`)") from None
    ex = submitit.AutoExecutor(folder=str(folder(cfg)), cluster=cfg.slurm_cluster)
    options = {"name": f"mixture-{cfg.series_name}", **parse_options(cfg.slurm_options)}
    try:
        ex.update_parameters(**options)
    except (ValueError, TypeError) as exc:
        raise FakegptError(f"--slurm-options {cfg.slurm_options}: {one_line(exc)}") from None
    return ex


def submit_array(cfg: Any) -> list[dict[str, Any]]:
    """Submit `cfg.slurm_array` workers as one job array and say where they are; with `--slurm-cluster local`
    wait for them and return the report's rows (a task that failed fails this command, with its error)."""
    ex = executor(cfg)
    task_cfg = dataclasses.replace(cfg, slurm_array=0)
    with ex.batch():  # one sbatch --array for all tasks
        jobs = [ex.submit(array_task, task_cfg) for _ in range(cfg.slurm_array)]
    ids = ", ".join(str(job.job_id) for job in jobs)
    print(
        f"series {cfg.series_name}: submitted {len(jobs)} worker task(s) ({ids}) on {cfg.slurm_cluster}; their "
        f"logs are in {folder(cfg)}; the last worker builds the report",
        flush=True,
    )
    if cfg.slurm_cluster != "local":
        return []
    return wait(jobs)


def wait(jobs: list[Any]) -> list[dict[str, Any]]:
    """Every task's outcome: the report's rows (every worker returns them), or the first task's error."""
    rows: list[dict[str, Any]] = []
    errors = []
    for job in jobs:
        try:
            rows = job.result() or rows
        except Exception as exc:  # submitit re-raises a task's error with its log: keep its last line
            last = [line for line in str(exc).strip().splitlines() if line.strip()]
            errors.append(f"task {job.job_id}: {last[-1] if last else type(exc).__name__}")
    if errors:
        raise FakegptError("--slurm-array: " + "; ".join(errors))
    return rows
