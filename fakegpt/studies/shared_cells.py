"""A series shared by machines (`fakegpt mixture --storage URL`): its cells claimed one by one from an Optuna study.

The study lives on the storage `fakegpt tune` uses (PostgreSQL, SQLite or an Optuna journal file), under a name
made of the series name and a digest of everything its steps' results depend on (settings, the content of the
files they read, fakegpt's version and code state: steps.step_key), so the same command on every machine joins
the same study and a changed series starts a new one. Its trials are a grid, each enqueued with fixed params:

- one `setup` trial: create the series' MLflow parent run, prepare the general held-out set and every dose's
  mixture (content-keyed steps, done once so that every cell of a dose reads the same prepared run), then
  enqueue one `cell` trial per dose x seed and one `report` trial;
- the `cell` trials: each runs one cell (finetune -> sample -> score, cells.run_cell) as a child of the parent
  run and ends COMPLETE with the cell's claim score, or FAIL with the reason (user attr `error`);
- the `report` trial, claimed once no cell is waiting or running: the report from the finished cells, as the
  one-process series writes it (mixture.report), into the parent run, which then ends FINISHED, or FAILED when a
  cell failed for good.

A worker claims a WAITING trial by moving it to RUNNING, which the storage grants to one worker only (a row lock
on SQL storages), and beats a heartbeat while it runs it. A trial whose worker died (its heartbeats stopped, or
its process on this host is gone) is failed by the next worker that looks, and like a trial that failed it is
enqueued again until it has had 1 + --retries attempts. A worker with nothing to claim waits while others run
(it takes over their cells if they die) and exits once the report is built, non-zero when a cell failed.
A cell taken over from a dead worker continues its fine-tune from the resume state in the step's output folder
(cells.finetune_step): `out_root` must be on a disk every machine sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from fakegpt import tracking
from fakegpt.errors import FakegptError, one_line
from fakegpt.studies import optuna_storage
from fakegpt.studies.cells import CellJob, run_cell
from fakegpt.studies.dose_response import Cell
from fakegpt.studies.main import (
    PROJECT_DIR,
    child_python,
    finetune_params,
    general_data_uri,
    prepare_params,
    print_where,
    sample_params,
    score_params,
)
from fakegpt.studies.mixture import (
    MixtureConfig,
    base_step,
    cell_jobs,
    check_one_method,
    logged_config,
    mix_arg,
    prepare_doses,
    report,
    series_step,
    series_tags,
    unfinished_line,
)
from fakegpt.studies.steps import step_key

log = logging.getLogger(__name__)

KIND = "kind"
SETUP, CELL, REPORT = "setup", "cell", "report"
POLL_SECONDS = 2.0  # how often an idle worker looks for a cell to claim or a dead worker's cell
# Settings that say how a worker runs, not what the series is: they stay out of the study's name.
WORKER_FIELDS = (
    "workers",
    "retries",
    "storage",
    "heartbeat_interval",
    "report_only",
    "slurm_array",
    "slurm_options",
    "slurm_cluster",
    "slurm_folder",
)
DIED = "its worker died mid-cell (killed or lost)"
TAG_SHARED_STUDY = "fakegpt.shared_study"  # on a shared series' parent run: the Optuna study its cells are in


def study_name(cfg: MixtureConfig) -> str:
    """`mixture-SERIES-DIGEST`: the same for every machine running the same series on the same code and inputs."""
    settings = {k: v for k, v in logged_config(cfg).items() if k not in WORKER_FIELDS}
    placeholder = "runs:/-/data"  # the steps' run ids are not known yet; their keys cover everything else
    steps = [("prepare", prepare_params(cfg, "", cfg.dataset, mix_arg(cfg, f))) for f in cfg.fractions]
    steps += [
        ("finetune", finetune_params(cfg, placeholder)),
        ("sample", sample_params(cfg, "runs:/-/checkpoint")),
        ("score", score_params(cfg, "runs:/-/checkpoint", placeholder, cfg.general_data)),
    ]
    keys = [step_key(name, {k: str(v) for k, v in params.items()}, PROJECT_DIR, Path.cwd()) for name, params in steps]
    body = json.dumps({"settings": settings, "steps": [k.key for k in keys]}, sort_keys=True, default=str)
    return f"mixture-{cfg.series_name}-{hashlib.sha256(body.encode()).hexdigest()[:12]}"


def fixed(trial: Any) -> dict[str, Any]:
    """A trial's enqueued params: kind, and a cell's fraction and seed."""
    return dict(trial.system_attrs.get("fixed_params", {}))


def _retry(study: Any, trial: Any, reason: str) -> None:
    """Enqueue a failed trial again while it has attempts left (1 + the study's retries); the worker that failed
    it calls this, once (the storage lets only one worker end a trial)."""
    if "error" not in trial.user_attrs:  # failed by Optuna (stale): a finished trial's attrs are read-only
        study.set_user_attr(f"error-{trial.number}", reason)
    attempt = int(trial.user_attrs.get("attempt", 1))
    limit = 1 + int(study.user_attrs.get("retries", 0))
    what = _describe(fixed(trial))
    if attempt >= limit:
        log.warning("%s failed for good after %d attempt(s): %s", what, attempt, reason)
        return
    log.info("%s failed (attempt %d of %d): %s; enqueued again", what, attempt, limit, reason)
    study.enqueue_trial(fixed(trial), user_attrs={"attempt": attempt + 1, "retry_of": trial.number})


def error_of(study: Any, trial: Any) -> str:
    """Why a trial failed: its own attr, or the study's note for a trial Optuna failed as stale."""
    return str(trial.user_attrs.get("error") or study.user_attrs.get(f"error-{trial.number}") or "unknown")


def _on_stale(study: Any, trial: Any) -> None:
    """Optuna's callback for a trial whose worker stopped sending heartbeats (it has failed it)."""
    _retry(study, trial, DIED)


def _describe(params: dict[str, Any]) -> str:
    if params.get(KIND) == CELL:
        return f"cell f={params['fraction']:g} seed={params['seed']}"
    return f"the series' {params.get(KIND, '?')} step"


def open_study(cfg: MixtureConfig, url: str, name: str) -> tuple[Any, bool]:
    """The series' study on `url`, created (with its setup trial) when this worker is the first: (study, created).
    Creating is atomic on the storage (the name is unique), so exactly one worker enqueues the setup."""
    import optuna

    storage = optuna_storage.open_storage(url, cfg.heartbeat_interval, _on_stale)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage)
        interval = study.user_attrs.get("heartbeat_interval")
        if interval is not None and interval != cfg.heartbeat_interval:  # judge the others by the study's interval
            log.info("study %s uses --heartbeat-interval %s (set when it was created)", name, interval)
            storage = optuna_storage.open_storage(url, int(interval), _on_stale)
            study = optuna.load_study(study_name=name, storage=storage)
        return study, False
    except Exception as exc:
        raise FakegptError(
            f"--storage {optuna_storage.display_url(url)}: cannot open study {name!r} ({one_line(exc, with_type=True)})"
        ) from None
    for key, value in (
        ("series", cfg.series_name),
        ("retries", cfg.retries),
        ("heartbeat_interval", cfg.heartbeat_interval),
    ):
        study.set_user_attr(key, value)
    study.enqueue_trial({KIND: SETUP})
    return study, True


class Heartbeat:
    """Record a claimed trial's heartbeat every `interval` seconds from a thread, while the trial runs: the next
    worker fails it (and hands it on) once the beats stop. Storages without heartbeats get none."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.interval > 0 and hasattr(self.storage, "record_heartbeat"):
            self.storage.record_heartbeat(self.trial_id)
            self.thread = threading.Thread(target=self._beat, name="cell-heartbeat", daemon=True)
            self.thread.start()
        return self

    def _beat(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a lost connection: the next beat tries again
                log.warning("heartbeat of trial %d not recorded (%s)", self.trial_id, one_line(exc))

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def fail_dead(study: Any) -> None:
    """Fail the trials whose worker died and enqueue them again: heartbeats stopped (any host, SQL storages),
    or the worker's process on this host is gone (any storage)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" since Optuna 2.9
        optuna.storages.fail_stale_trials(study)  # calls _on_stale for the trials it failed
    for number in optuna_storage.fail_dead_local_trials(study):
        trial = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
        _retry(study, trial, DIED)


def claim(study: Any) -> Any | None:
    """A WAITING trial, now RUNNING for this worker (None when there is none it may take): setup and cells as they
    come, the report only once no setup or cell trial is waiting or running."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    busy = any(fixed(t).get(KIND) != REPORT and t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials)
    for trial in trials:
        if trial.state != TrialState.WAITING or (fixed(trial).get(KIND) == REPORT and busy):
            continue
        if study._storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING):
            study._storage.set_trial_user_attr(trial._trial_id, "worker", optuna_storage.worker_id())
            return study._storage.get_trial(trial._trial_id)
    return None


def finished(study: Any) -> Any | None:
    """The series' last report trial once nothing is waiting or running any more (None while work is left)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
        return None
    reports = [t for t in trials if fixed(t).get(KIND) == REPORT]
    setups = [t for t in trials if fixed(t).get(KIND) == SETUP]
    if not reports and setups and all(t.state == TrialState.FAIL for t in setups):
        return setups[-1]  # the setup failed for good: there is no grid to report on
    return reports[-1] if reports else None


class Worker:
    """One machine's part of a shared series: claims and runs trials until the series is reported."""

    def __init__(self, cfg: MixtureConfig, method: str, study: Any):
        self.cfg, self.method, self.study = cfg, method, study
        self.joined = ""

    def join(self) -> str:
        """Make the series' parent run this process's active run (once): the cells' runs are its children."""
        parent = str(self.study.user_attrs["parent_run"])
        if self.joined != parent:
            tracking.join_run(parent)
            self.joined = parent
        return parent

    def run(self, trial: Any) -> None:
        """Run one claimed trial and end it: COMPLETE, or FAIL with its reason (enqueued again while it has
        attempts left)."""
        import optuna
        from optuna.trial import TrialState

        storage, params = self.study._storage, fixed(trial)
        interval = float(self.study.user_attrs.get("heartbeat_interval", self.cfg.heartbeat_interval))
        try:
            with Heartbeat(storage, trial._trial_id, interval):
                kind = params.get(KIND)
                if kind == SETUP:
                    value = self.setup()
                elif kind == CELL:
                    value = self.cell(trial, float(params["fraction"]), int(params["seed"]))
                elif kind == REPORT:
                    value = self.report(trial)
                else:
                    raise FakegptError(f"study {self.study.study_name}: trial {trial.number} has no known kind")
        except (Exception, KeyboardInterrupt) as exc:  # any error fails this trial, not the worker
            if isinstance(exc, KeyboardInterrupt):
                reason = optuna_storage.INTERRUPTED
            else:
                reason = one_line(exc, with_type=not isinstance(exc, FakegptError))
            try:
                storage.set_trial_user_attr(trial._trial_id, "error", reason)
                storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning("trial %d was failed by another worker meanwhile (heartbeats missed)", trial.number)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return
            _retry(self.study, storage.get_trial(trial._trial_id), reason)
            if isinstance(exc, KeyboardInterrupt):
                raise
            return
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, values=[value])
        except optuna.exceptions.UpdateFinishedTrialError:  # its retry will find every step finished and reuse it
            log.warning("trial %d was failed by another worker meanwhile (heartbeats missed)", trial.number)

    def setup(self) -> float:
        """The parent run, the general held-out set, every dose's mixture, then the grid of cells and the report."""
        cfg, study = self.cfg, self.study
        if "parent_run" not in study.user_attrs:  # a setup retried after its worker died may have made it already
            study.set_user_attr("parent_run", create_parent(cfg, self.method, study.study_name))
        parent = self.join()
        check_one_method(cfg, self.method, tracking.get_run(parent).info.experiment_id)
        general = general_data_uri(cfg, lambda name, params: series_step(cfg, name, params, "general", {}) or "")
        prepared = prepare_doses(cfg)
        study.set_user_attr("general", general)
        study.set_user_attr("prepared", [[f, run] for f, run in prepared.items()])
        present = {(fixed(t).get("fraction"), fixed(t).get("seed")) for t in study.get_trials(deepcopy=False)}
        for job in cell_jobs(cfg, self.method, prepared, general):
            if (job.fraction, job.seed) not in present:
                study.enqueue_trial({KIND: CELL, "fraction": job.fraction, "seed": job.seed})
        if not any(fixed(t).get(KIND) == REPORT for t in study.get_trials(deepcopy=False)):
            study.enqueue_trial({KIND: REPORT})
        return 0.0

    def jobs(self) -> dict[tuple[float, int], CellJob]:
        """The grid's cells, from what the setup stored (the same prepared runs for every worker)."""
        prepared = {float(f): str(run) for f, run in self.study.user_attrs["prepared"]}
        jobs = cell_jobs(self.cfg, self.method, prepared, str(self.study.user_attrs["general"]))
        return {(job.fraction, job.seed): job for job in jobs}

    def cell(self, trial: Any, fraction: float, seed: int) -> float:
        """Run one cell as run_cell does (one attempt: the study counts them), continuing a dead worker's
        fine-tune; its claim score is the trial's value."""
        parent = self.join()
        job = self.jobs()[(fraction, seed)]
        cfg = dataclasses.replace(self.cfg, retries=0)
        cell = run_cell(cfg, job, parent_run=parent)
        if cell.status != "finished":
            raise FakegptError(cell.error or f"cell f={fraction:g} seed={seed} did not finish")
        self.study._storage.set_trial_user_attr(trial._trial_id, "runs", cell.runs)
        if int(trial.user_attrs.get("attempt", 1)) > 1:
            try:
                end_left_runs(parent, cell.runs)
            except Exception as exc:  # bookkeeping never fails a cell that finished
                log.warning("could not end the runs a dead worker left (%s)", one_line(exc, with_type=True))
        value = cell.metrics.get(tracking.M_CLAIM_SCORE)
        return float(value) if value is not None and math.isfinite(value) else 0.0

    def grid(self) -> list[Cell]:
        """Every cell of the series in grid order: its last trial's outcome (finished with its runs, or failed)."""
        from optuna.trial import TrialState

        last: dict[tuple[float, int], Any] = {}
        for t in self.study.get_trials(deepcopy=False):
            p = fixed(t)
            if p.get(KIND) == CELL:
                last[(float(p["fraction"]), int(p["seed"]))] = t  # trials come in number order: the last wins
        grid = []
        for (fraction, seed), job in self.jobs().items():
            t = last.get((fraction, seed))
            attempts = int(t.user_attrs.get("attempt", 1)) if t is not None else 0
            if t is not None and t.state == TrialState.COMPLETE:
                runs = {"prepare": job.prepare_run, **t.user_attrs["runs"]}
                metrics = dict(tracking.get_run(runs["score"]).data.metrics)
                grid.append(Cell(fraction, seed, runs, metrics, "finished", "", attempts))
            else:
                error = error_of(self.study, t) if t is not None else "not run"
                grid.append(Cell(fraction, seed, {"prepare": job.prepare_run}, {}, "failed", error, attempts))
        return grid

    def report(self, trial: Any) -> float:
        """The series' report into the parent run, which ends FINISHED (FAILED when a cell failed for good)."""
        parent = self.join()
        grid = self.grid()
        base_run = base_step(self.cfg, str(self.study.user_attrs["general"]))
        rows, table, failed = report(self.cfg, self.method, grid, base_run)
        line = unfinished_line(failed)
        storage = self.study._storage
        storage.set_trial_user_attr(trial._trial_id, "failed", line)
        storage.set_trial_user_attr(trial._trial_id, "rows", json.loads(json.dumps(rows, default=str)))
        storage.set_trial_user_attr(trial._trial_id, "reported_by", optuna_storage.worker_id())
        tracking.update_run(parent, status="FAILED" if failed else "FINISHED")
        print(table)
        if not failed:
            print_where(parent, {f"f={r['fraction']:g}": (r["score_run"], False) for r in rows}, self.cfg.out_root)
        return float(len(grid) - len(failed))


def create_parent(cfg: MixtureConfig, method: str, name: str) -> str:
    """The series' MLflow parent run, left RUNNING for every worker to join (the report ends it)."""
    from mlflow import MlflowClient

    tags = series_tags(cfg, method) | {TAG_SHARED_STUDY: name}
    with tracking.run(stage="mixture", run_name=None, tags=tags) as parent:
        tracking.log_params(logged_config(cfg))
        run_id = parent.info.run_id
    MlflowClient().update_run(run_id, status="RUNNING")
    return run_id


def end_left_runs(parent: str, runs: dict[str, str]) -> None:
    """Fail the step runs a dead worker left RUNNING for a cell another worker has now finished: the children of
    the parent that read this cell's fine-tune (its sample and score), or wrote into its output folder (a
    fine-tune that died before its first resume state)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = tracking.get_run(parent).info.experiment_id
    tuned = runs.get("finetune", "")
    out_dir = tracking.get_run(tuned).data.params.get("out_dir") if tuned else None
    left = client.search_runs(
        [experiment],
        filter_string=f"tags.`{tracking.TAG_PARENT}` = '{parent}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    mine = set(runs.values())
    for run in left:
        reads = bool(tuned) and tuned in run.data.params.get("models", "")
        writes = out_dir is not None and run.data.params.get("out_dir") == out_dir
        if run.info.run_id not in mine and (reads or writes):
            tracking.update_run(run.info.run_id, {tracking.TAG_ERROR: DIED}, "FAILED")


def leave(parent: str) -> None:
    """Stop being in the parent run without changing its status (the report set it; while cells are left it
    stays RUNNING): MLflow would otherwise end it FINISHED when this process exits."""
    import mlflow

    if not parent or mlflow.active_run() is None:
        return
    with contextlib.suppress(Exception):
        status = tracking.get_run(parent).info.status
        mlflow.end_run(status=status)


def run_worker(cfg: MixtureConfig, method: str) -> list[dict[str, Any]]:
    """This machine as one worker of the shared series: claim and run trials until the report is built; returns
    the report's rows; raises (naming them) when cells failed for good."""
    url = optuna_storage.storage_url(cfg.storage, str(PROJECT_DIR / cfg.out_root))
    name = study_name(cfg)
    study, created = open_study(cfg, url, name)
    print(
        f"series {cfg.series_name}: {'created' if created else 'joined'} study {name} in "
        f"{optuna_storage.display_url(url)} as worker {optuna_storage.worker_id()}",
        flush=True,
    )
    worker = Worker(cfg, method, study)
    ran = 0
    try:
        with child_python():
            while True:
                fail_dead(study)
                trial = claim(study)
                if trial is not None:
                    ran += 1
                    worker.run(trial)
                    continue
                done = finished(study)
                if done is not None:
                    break
                time.sleep(POLL_SECONDS)
    finally:
        leave(worker.joined)
    return outcome(cfg, study, done, ran)


def outcome(cfg: MixtureConfig, study: Any, done: Any, ran: int) -> list[dict[str, Any]]:
    """What the finished series says to this worker: the report's rows, or the failure every worker exits with."""
    from optuna.trial import TrialState

    who = done.user_attrs.get("reported_by", "")
    print(f"series {cfg.series_name}: this worker ran {ran} trial(s); report by {who or 'nobody'}", flush=True)
    if done.state == TrialState.FAIL:
        raise FakegptError(
            f"series {cfg.series_name}: its {fixed(done).get(KIND)} step failed: {error_of(study, done)} "
            f"(study {study.study_name})"
        )
    failed = done.user_attrs.get("failed", "")
    if failed:
        raise FakegptError(f"series {cfg.series_name}: {failed}; the report is in run {study.user_attrs['parent_run']}")
    return list(done.user_attrs.get("rows", []))
