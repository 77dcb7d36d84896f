"""The cells of a dose series: one finetune -> sample -> score chain per dose x training seed.

A cell is the unit that runs, fails, is retried and is reused: every step is content-keyed (steps.py), so a
cell that finished is never run again and a rerun of the series only runs what is missing. Cells run one
after another in the series' process (`--workers 1`, the default), or N at once in worker processes
(`--workers N`): each worker joins the series' parent run, so the cells' runs are its children whoever ran
them. A cell can have several GPUs (`--gpus-per-cell G`): its fine-tune then runs on G processes under
torchrun's agent (`finetune --nproc-per-node G`), its sample and score on the first of them. Worker
processes, not threads, because a cell's steps read their GPU and thread settings from the environment
(CUDA_VISIBLE_DEVICES, OMP_NUM_THREADS), which is per process; the pool is Python's own
(concurrent.futures), so no scheduler is written here. Across machines, cells are claimed through a shared
storage instead (fakegpt/studies/shared_cells.py); there a cell whose worker died continues its fine-tune from
the resume state that worker left in the step's output folder (`left_behind`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fakegpt import tracking
from fakegpt.errors import FakegptError, one_line
from fakegpt.studies.dose_response import Cell
from fakegpt.studies.main import (
    PROJECT_DIR,
    finetune_params,
    sample_params,
    score_params,
)
from fakegpt.studies.steps import find_step, run_entry_point, run_or_find, run_step, step_key

if TYPE_CHECKING:  # for annotations only: mixture imports this module
    from fakegpt.studies.mixture import MixtureConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellJob:
    """What a worker needs to run one cell (picklable: it crosses to a worker process)."""

    fraction: float
    seed: int
    first_seed: bool  # the first seed of its dose: its runs are those a one-seed series has
    prepare_run: str  # the dose's prepared mixture, shared by its seeds
    general: str  # the series' general held-out set ("" = none)
    method: str
    register_as: str  # "" = no registration
    alias: str


def step_tags(cfg: Any, fraction: float, method: str, name: str, seed: int | None) -> dict[str, str]:
    """The tags a series puts on a step's run: the dose, the series, and for a model's runs its method/seed."""
    tags = {tracking.TAG_FRACTION: f"{fraction:g}", tracking.TAG_STUDY: cfg.series_name}
    if name in ("sample", "score"):  # a model's runs (finetune tags itself; prepare is method-free)
        tags[tracking.TAG_METHOD] = method
    if seed is not None:
        tags[tracking.TAG_SEED] = str(seed)
    return tags


def out_path(params: dict[str, Any]) -> Path:
    """A step's output folder as the step sees it: relative paths are from the checkout, where steps run."""
    path = Path(str(params["out_dir"]))
    return path if path.is_absolute() else PROJECT_DIR / path


def left_behind(params: dict[str, Any], parent_run: str) -> tuple[str, bool] | None:
    """The fine-tune run a dead worker left for these step parameters under `parent_run`: (run id, finished).

    Found through the resume state in the step's output folder (it names its run); taken only when that run is a
    finetune child of the same parent with the very same step parameters, so a state from another series, code
    state or configuration in the same folder is never continued. `finished`: the run ended but its worker died
    before tagging it as the step (it is adopted, not run again)."""
    from fakegpt.finetune import state as state_mod

    try:
        folder = state_mod.latest(str(out_path(params)))
        run_id = state_mod.read_info(folder).run_id if folder is not None else None
        run = tracking.get_run(run_id) if run_id else None
    except Exception:  # a damaged state or a run this store does not have: nothing to continue
        return None
    if run_id is None or run is None or run.data.tags.get(tracking.TAG_PARENT) != parent_run:
        return None
    if run.data.tags.get(tracking.TAG_ENTRY_POINT) != "finetune":
        return None
    logged = run.data.params
    if any(logged.get(k) != ("" if v is None else str(v)) for k, v in params.items()):
        return None
    return run_id, run.info.status == "FINISHED"


def finetune_step(cfg: Any, params: dict[str, Any], parent_run: str) -> tuple[str, bool]:
    """The finetune step of a cell under a shared series' parent run: reused when finished, continued from the
    resume state when a dead worker left one (in the run it started, which then counts as the step: it gets the
    step's key), else run. Returns (run id, reused)."""
    if cfg.reuse != "false":
        found = find_step(PROJECT_DIR, "finetune", params)
        if found:
            return found, True
    left = left_behind(params, parent_run)
    if left is None:
        return run_step(PROJECT_DIR, "finetune", params, cfg.env_manager, reuse=cfg.reuse)
    run_id, finished = left
    if not finished:
        log.info("finetune %s: continuing run %s from its resume state", params["out_dir"], run_id)
        resume = {k: ("" if v is None else str(v)) for k, v in params.items()} | {"init_from": "resume"}
        run_entry_point(PROJECT_DIR, "finetune", resume, cfg.env_manager, run_id=run_id)
    key = step_key("finetune", {k: ("" if v is None else str(v)) for k, v in params.items()}, PROJECT_DIR, Path.cwd())
    tracking.update_run(run_id, {tracking.TAG_STEP_KEY: key.key, tracking.TAG_CODE_STATE: key.code_state or ""})
    return run_id, finished


def _step(
    cfg: Any, job: CellJob, cell: Cell, name: str, params: dict[str, Any], lookup: bool, parent_run: str = ""
) -> str | None:
    """Run (or, with `lookup`, only find) one step of a cell, tag it and say so; its run id. With `parent_run`
    (a shared series) a fine-tune a dead worker left behind is continued."""
    run_id: str | None
    if name == "finetune" and parent_run and not lookup:
        run_id, reused = finetune_step(cfg, params, parent_run)
    else:
        run_id, reused = run_or_find(PROJECT_DIR, name, params, cfg.env_manager, cfg.reuse, lookup)
    if run_id is None:
        return None
    cell.runs[name] = run_id
    tracking.update_run(run_id, tags=step_tags(cfg, job.fraction, job.method, name, job.seed))
    where = f"f={job.fraction:g}" + (f" seed={job.seed}" if cfg.seeds > 1 else "")
    print(f"[{where}] [{name}] {'reused' if reused else 'ran'} run {run_id}", flush=True)
    return run_id


def cell_finetune_params(cfg: MixtureConfig, job: CellJob) -> dict[str, Any]:
    """The parameters of a cell's finetune step: its dose's prepared data, its seed (from the second seed on:
    the first seed's runs are those a one-seed series has), its processes (only when more than one, so a
    one-GPU cell keeps the step key it always had) and where its model is registered."""
    extra: dict[str, Any] = {} if job.first_seed else {"seed": job.seed}
    if cfg.gpus_per_cell > 1:
        extra["nproc_per_node"] = cfg.gpus_per_cell
    if job.register_as:
        extra.update({"register_as": job.register_as, "register_alias": job.alias})
    return finetune_params(cfg, f"runs:/{job.prepare_run}/data", extra)


def run_cell(cfg: MixtureConfig, job: CellJob, lookup: bool = False, parent_run: str = "") -> Cell:
    """One cell's finetune -> sample -> score, retried up to `cfg.retries` times after a failure (the steps that
    finished are reused by a retry); with `lookup`, only the finished runs are found (status "missing" when a
    step has none). `parent_run`: the shared series' parent, under which a dead worker's fine-tune is
    continued."""
    cell = Cell(fraction=job.fraction, seed=job.seed, runs={"prepare": job.prepare_run})
    data_uri = f"runs:/{job.prepare_run}/data"
    tries = 1 if lookup else 1 + max(0, cfg.retries)
    for attempt in range(1, tries + 1):
        cell.attempts = attempt
        try:
            tuned = _step(cfg, job, cell, "finetune", cell_finetune_params(cfg, job), lookup, parent_run)
            model = f"runs:/{tuned}/checkpoint"
            sampled = tuned and _step(cfg, job, cell, "sample", sample_params(cfg, model), lookup)
            scored = sampled and _step(cfg, job, cell, "score", score_params(cfg, model, data_uri, job.general), lookup)
            if scored is None:
                cell.status = "missing"
                return cell
            cell.metrics = dict(tracking.get_run(scored).data.metrics)
            cell.status, cell.error = "finished", ""
            return cell
        except FakegptError as exc:
            cell.status, cell.error = "failed", one_line(exc)
            where = f"f={job.fraction:g} seed={job.seed}"
            left = tries - attempt
            print(f"[{where}] failed (attempt {attempt} of {tries}): {cell.error}", flush=True)
            if left:
                log.info("cell %s: retrying (%d left)", where, left)
    return cell


def _worker_init(parent_run: str, slots: Any, gpus_per_worker: int, threads: int) -> None:
    """A worker process: its own GPUs (or CPU threads), and the series' parent run as its active run."""
    slot = slots.get()
    if gpus_per_worker:
        first = slot * gpus_per_worker
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(gpus_per_worker))
    elif threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    tracking.join_run(parent_run)


def gpu_count(device: str) -> int:
    """The GPUs this machine offers a series (0 when --device names the CPU or there is no CUDA)."""
    if device.startswith("cpu"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_cells(cfg: Any, jobs: Iterable[CellJob], parent_run: str, lookup: bool = False) -> list[Cell]:
    """Every job's cell, in `jobs` order: in this process (`cfg.workers` 1), or in `cfg.workers` processes,
    each on its own `cfg.gpus_per_cell` GPUs (consecutive ones) when the machine has GPUs, else sharing the
    CPU cores between them. `jobs` may be a generator that prepares data between its jobs (mixture's doses):
    each job is handed to a worker as soon as it is yielded, so the workers run while it prepares."""
    per_cell = max(1, cfg.gpus_per_cell)
    if lookup:
        return [run_cell(cfg, job, lookup) for job in jobs]
    gpus = gpu_count(cfg.device)
    if gpus and gpus < cfg.workers * per_cell:
        raise FakegptError(
            f"--workers {cfg.workers} --gpus-per-cell {per_cell}: {cfg.workers * per_cell} GPUs are needed and "
            f"this machine has {gpus}"
        )
    if cfg.workers <= 1 or (isinstance(jobs, list) and len(jobs) <= 1):
        return [run_cell(cfg, job, lookup) for job in jobs]
    per_worker = per_cell if gpus else 0
    # without GPUs the cores are shared out between every process of every cell (a cell under torchrun has
    # --gpus-per-cell of them)
    threads = 0 if per_worker else max(1, (os.cpu_count() or 1) // (cfg.workers * per_cell))
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked MLflow/SQLite connections
    slots = ctx.Queue()
    for slot in range(cfg.workers):
        slots.put(slot)
    pool = ProcessPoolExecutor(
        cfg.workers, mp_context=ctx, initializer=_worker_init, initargs=(parent_run, slots, per_worker, threads)
    )
    try:
        submitted = [(job, pool.submit(run_cell, cfg, job)) for job in jobs]
    except BaseException:  # a later dose's prepare failed: the cells running finish (and are reused), no more start
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    with pool:
        cells = []
        for job, future in submitted:
            try:
                cells.append(future.result())
            except BrokenProcessPool:  # a worker died (killed, out of memory): its cell is failed, not lost
                cells.append(
                    Cell(job.fraction, job.seed, {"prepare": job.prepare_run}, status="failed", error="worker died")
                )
    return cells
