"""Optuna plumbing for `fakegpt tune`: storages, pruners, samplers, dead workers' trials, enqueued trials, plots.

A storage is an SQLAlchemy URL (SQLite, PostgreSQL, MySQL) or an Optuna journal file. SQL storages get Optuna's
heartbeat, so a trial whose worker vanished (on any machine) is failed by the next worker; on any storage a
RUNNING trial whose worker process on this host is gone is failed at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fakegpt import tracking
from fakegpt.errors import FakegptError, one_line
from fakegpt.files import atomic_path

log = logging.getLogger(__name__)

PRUNERS = ("none", "median", "percentile", "hyperband", "successive-halving")
SAMPLERS = ("tpe", "random")
JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running"}
INTERRUPTED = "interrupted (Ctrl-C)"
DIED = "died mid-trial"


def worker_id() -> str:
    """`host:pid` of this worker, stored on each trial it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def storage_url(spec: str, out_dir: str) -> str:
    """Normalise --storage: a URL stays, a *.log file is a journal, any other file (or empty) is SQLite."""
    if "://" in spec:
        return spec
    path = Path(spec) if spec else Path(out_dir) / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in JOURNAL_SUFFIXES:
        return f"journal:{path.resolve()}"
    return f"sqlite:///{path.resolve()}"


def display_url(url: str) -> str:
    """The storage URL with any password hidden, for logs and errors."""
    if url.startswith("journal:"):
        return url[len("journal:") :]
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def open_storage(url: str, heartbeat_interval: int, on_stale: Callable | None) -> Any:
    """An Optuna storage for `url` (SQLite, PostgreSQL or a journal file) with heartbeats when asked."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(url[len("journal:") :]))
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 120}  # wait for the other workers' writes, don't fail
    elif url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # a server that is down: fail fast
    hb = heartbeat_interval if heartbeat_interval > 0 else None
    for attempt in range(3):  # workers creating a new database at the same moment can race on its tables
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # heartbeat options are "experimental"
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=hb,
                    grace_period=2 * hb if hb else None,
                    heartbeat_stale_trial_callback=on_stale if hb else None,
                )
        except ImportError as exc:
            raise FakegptError(
                f"--storage {display_url(url)}: a database driver is missing ({exc}); for "
                "PostgreSQL `pip install 'fakegpt[postgres]'`"
            ) from None
        except Exception as exc:
            if attempt == 2 or not url.startswith("sqlite"):
                raise FakegptError(
                    f"--storage {display_url(url)}: cannot open the Optuna storage ({one_line(exc, with_type=True)})"
                ) from None
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def make_pruner(cfg: Any) -> Any:
    """The Optuna pruner `cfg.pruner` names, with its start-up and warm-up settings."""
    import optuna

    unit = max(1, cfg.token_budget // cfg.n_evals)
    # Steps are token counts k x budget / n_evals; the first prunable one comes after pruner_warmup_evals of them.
    warmup = math.floor(cfg.pruner_warmup_evals * cfg.token_budget / cfg.n_evals) + 1
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=warmup)
    if cfg.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            cfg.pruner_percentile, n_startup_trials=cfg.pruner_startup_trials, n_warmup_steps=warmup
        )
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=unit, max_resource=cfg.token_budget)
    if cfg.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=unit)
    return optuna.pruners.NopPruner()


def make_sampler(cfg: Any) -> Any:
    """The Optuna sampler `cfg.sampler` names, seeded."""
    import optuna

    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.sampler_seed)
    return optuna.samplers.TPESampler(seed=cfg.sampler_seed)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):  # a zombie (killed, not yet reaped) is dead too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _mark_dead(trial: Any, reason: str) -> None:
    """Tag the MLflow run of a trial whose worker died (Optuna has already failed it, or we just did)."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    parent = trial.user_attrs.get("mlflow_parent_run_id")
    with contextlib.suppress(Exception):
        if run_id is None and parent:
            exp = tracking.get_run(parent).info.experiment_id
            run_id = next(
                iter(tracking.find_run_ids(exp, {tracking.TAG_PARENT: parent, tracking.TAG_TRIAL: trial.number})), None
            )
        if run_id:
            tracking.update_run(run_id, {tracking.TAG_TRIAL_STATE: "failed", tracking.TAG_ERROR: reason}, "FAILED")
    log.warning("trial %d: %s; marked failed", trial.number, reason)


def on_heartbeat_stale(study: Any, trial: Any) -> None:
    """Optuna's callback for a trial whose worker stopped sending heartbeats: mark its run failed."""
    _mark_dead(trial, "its worker stopped sending heartbeats (killed or lost)")


def fail_dead_local_trials(study: Any) -> list[int]:
    """Fail RUNNING trials whose worker process on this host is gone (any storage, no heartbeat needed)."""
    import optuna
    from optuna.trial import TrialState

    host, failed = socket.gethostname(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker_host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if worker_host != host or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        reason = f"its worker (pid {pid} on {host}) {DIED}"
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "error", reason)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        _mark_dead(trial, reason)
        failed.append(trial.number)
    return failed


class _QuietExpectedFailures(logging.Filter):
    """Optuna logs a failed trial with its traceback; for a FakegptError (e.g. NaN loss) one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], FakegptError):
            record.exc_info = None
        return True


@contextlib.contextmanager
def quiet_expected_failures() -> Iterator[None]:
    """Silence Optuna's warnings for trials that fail by design (pruned, interrupted)."""
    logger, quiet = logging.getLogger("optuna.study._optimize"), _QuietExpectedFailures()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def already_tried(study: Any, params: dict[str, Any]) -> bool:
    """Whether an enqueued trial has run (or is queued); one cut short by Ctrl-C or a dead worker is run again."""
    for trial in study.get_trials(deepcopy=False):
        fixed = trial.system_attrs.get("fixed_params", trial.params)
        if fixed.keys() != params.keys() or any(
            not (fixed[k] == v or (isinstance(v, float) and math.isclose(float(fixed[k]), v, rel_tol=1e-9)))
            for k, v in params.items()
        ):
            continue
        error = trial.user_attrs.get("error")
        cut_short = trial.state.name == "FAIL" and (error is None or error.startswith(INTERRUPTED) or DIED in error)
        if not cut_short:
            return True
    return False


def study_counts(study: Any) -> dict[str, int]:
    """Number of trials per state (complete, pruned, failed, running) in `study`."""
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        name = STATE_NAMES.get(t.state.name, t.state.name.lower())
        counts[name] = counts.get(name, 0) + 1
    return counts


def _relabel(ax: Any, xlabel: str, ylabel: str) -> Any:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return ax


def save_plots(study: Any, folder: Path, space: dict) -> list[Path]:
    """Optuna's matplotlib plots as PNGs; a plot that cannot be drawn yet (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    pair = [p for p in ("learning_rate", "gradient_accumulation_steps") if p in space]
    plots: dict[str, Callable[[], Any]] = {
        "optimization_history": lambda: ovm.plot_optimization_history(study),
        "intermediate_values": lambda: _relabel(
            ovm.plot_intermediate_values(study), "tokens seen", "validation loss"
        ),  # every trial's curve
        "param_importances": lambda: ovm.plot_param_importances(study),
    }
    if len(pair) == 2:
        plots["contour_lr_accum"] = lambda: ovm.plot_contour(study, params=pair)
    else:
        plots["slice"] = lambda: ovm.plot_slice(study)
    written = []
    mpl_log = logging.getLogger("matplotlib")
    level = mpl_log.level
    mpl_log.setLevel(logging.WARNING)  # "categorical units" notes about the accumulation axis
    try:
        for name, draw in plots.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is "experimental"
                    ax = draw()
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
                    fig.set_size_inches(8, 5)
                    fig.tight_layout()
                with atomic_path(folder / f"{name}.png", suffix=".png") as tmp:
                    fig.savefig(tmp, format="png", dpi=100)
                written.append(folder / f"{name}.png")
            except Exception as exc:
                log.info("plot %s skipped (%s)", name, one_line(exc, with_type=True))
            finally:
                plt.close("all")
    finally:
        mpl_log.setLevel(level)
    return written
