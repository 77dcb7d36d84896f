"""`fakegpt tune`: an Optuna study over learning rate and gradient accumulation, built on `finetune`.

A sweep YAML (experiments/sweeps/) holds the study settings (TuneConfig's fields), a `search_space`
(finetune field -> {type: float|int|categorical, low, high, log, step, choices}), optional `enqueue` (trials
to run first, e.g. the hand-picked baseline) and `base`, the fixed finetune configuration (a mapping, or
the path of a finetune YAML). Every TuneConfig and FinetuneConfig field is also a flag.

Fairness: every trial trains on the same number of tokens (`token_budget`), whatever its accumulation:
max_iters = ceil(budget / (batch_size * block_size * accumulation)). It evaluates every 1/n_evals of the
budget and at its end, on finetune's fixed validation windows, and reports the validation loss to Optuna
at those token counts, so the pruner compares trials at equal data seen. The objective is the best
validation loss reached within the budget.

Storage: an SQLAlchemy URL or a file (*.db SQLite, *.log Optuna journal), by default OUT_DIR/optuna.db.
The same command continues the study; several processes on one storage share it. Each invocation is one
MLflow parent run; each trial is finetune's own run, nested under it, tagged with its trial number and state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import shutil
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from fakegpt import config, tracking
from fakegpt.errors import FakegptError, one_line
from fakegpt.files import write_text
from fakegpt.finetune import checks as finetune_checks
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.hooks import Hooks
from fakegpt.finetune.train import finetune
from fakegpt.models.checkpoint import CHECKPOINT_DIR
from fakegpt.studies import optuna_storage

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = "out/tune"
# Fields a trial's configuration gets from the token budget (or from tune itself): not searchable.
DERIVED = (
    "max_iters",
    "eval_interval",
    "warmup_iters",
    "out_dir",
    "always_save_checkpoint",
    "lr_decay_iters",
    "save_state",
)
SPEC_KEYS = {"type", "low", "high", "log", "step", "choices"}
MLFLOW_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED"}


def default_search_space() -> dict[str, dict[str, Any]]:
    """The study's default space: log-uniform learning rate x gradient accumulation."""
    return {
        "learning_rate": {"type": "float", "low": 1e-6, "high": 1e-3, "log": True},
        "gradient_accumulation_steps": {"type": "categorical", "choices": [1, 2, 4, 8, 16, 32, 64]},
    }


@dataclass
class TuneConfig:
    """`fakegpt tune` settings: the study (name, storage, trials, budget, pruner, sampler)."""

    study_name: str = field(
        default="lr-accum",
        metadata={"help": "Optuna study name; the same name on the same storage continues the study"},
    )
    n_trials: int = field(
        default=20, metadata={"help": "trials this process runs (processes sharing a storage add theirs up)"}
    )
    storage: str = field(
        default="",
        metadata={
            "help": "SQLAlchemy URL (sqlite:///f.db, postgresql+psycopg://user:pw@host/db, mysql+pymysql://...) or a "
            "file: *.db SQLite, *.log Optuna journal; empty = OUT_DIR/optuna.db"
        },
    )
    token_budget: int = field(
        default=5_242_880,
        metadata={"help": "training tokens per trial (batch_size x block_size x accumulation x iterations)"},
    )
    n_evals: int = field(
        default=10, metadata={"help": "evaluations per trial, every 1/n_evals of the token budget (the pruning points)"}
    )
    pruner: str = field(default="median", metadata={"help": " | ".join(optuna_storage.PRUNERS)})
    pruner_startup_trials: int = field(
        default=5, metadata={"help": "finished trials before median/percentile pruning starts"}
    )
    pruner_warmup_evals: int = field(
        default=2, metadata={"help": "evaluations every trial gets before it can be pruned"}
    )
    pruner_percentile: float = field(
        default=25.0, metadata={"help": "percentile pruner: prune trials worse than this percentile of the others"}
    )
    sampler: str = field(default="tpe", metadata={"help": " | ".join(optuna_storage.SAMPLERS)})
    sampler_seed: int | None = field(default=None, metadata={"help": "seed of the sampler (empty = random)"})
    timeout: float | None = field(
        default=None, metadata={"help": "start no new trial after this many seconds (empty = no limit)"}
    )
    heartbeat_interval: int = field(
        default=60,
        metadata={
            "help": "SQL storages: seconds between a running trial's heartbeats; a trial silent for twice this "
            "is failed by the next worker (0 = off)"
        },
    )
    plots: bool = field(
        default=True,
        metadata={"help": "draw Optuna's plots (history, importances, lr x accumulation contour, curves) at the end"},
    )
    keep_checkpoints: bool = field(
        default=False,
        metadata={
            "help": "keep every trial's best checkpoint (default: deleted after the trial; re-run the best "
            "configuration with `fakegpt finetune`)"
        },
    )
    trial_states: bool = field(
        default=False,
        metadata={
            "help": "write each trial's resume state (OUT/STUDY/trial-N/state/); off: a trial is re-run, not "
            "resumed, and writing model + optimizer state only to delete it costs time and disk"
        },
    )


@dataclass
class TuneResult:
    """What one `fakegpt tune` invocation did: the trials it ran, their states, and the best over the whole study."""

    study_name: str
    storage: str
    trials_run: list[int]  # numbers of the trials this invocation ran
    states: dict[int, str]  # their states: complete | pruned | failed
    best_value: float | None  # over the whole study (all invocations and workers)
    best_params: dict[str, Any]
    best_trial: int | None
    best_config: Path | None  # the ready-to-run finetune YAML
    parent_run_id: str


# --- the sweep: YAML + flags -> (TuneConfig, FinetuneConfig, search space, enqueued trials) -----------------


def check_search_space(space: Any, source: str) -> dict[str, dict[str, Any]]:
    """Validate a search space against FinetuneConfig's fields; errors name the file and key."""
    if not isinstance(space, dict) or not space:
        raise FakegptError(f"{source}: search_space must be a non-empty mapping of finetune fields")
    hints = typing.get_type_hints(FinetuneConfig)
    checked: dict[str, dict[str, Any]] = {}
    for name, spec in space.items():
        where = f"{source}: search_space.{name}"
        if name not in hints:
            raise FakegptError(f"{where}: not a finetune field (known: {', '.join(sorted(hints))})")
        if name in DERIVED or name in ("init_from", "data_dir", "device"):
            raise FakegptError(f"{where}: tune sets this field itself; it cannot be searched")
        if not isinstance(spec, dict) or set(spec) - SPEC_KEYS or "type" not in spec:
            raise FakegptError(f"{where}: expected a mapping with 'type' and some of {sorted(SPEC_KEYS - {'type'})}")
        kind = spec["type"]
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise FakegptError(f"{where}: a categorical needs a non-empty list of choices")
            checked[name] = {"type": kind, "choices": [config.coerce(c, hints[name], where) for c in choices]}
        elif kind in ("float", "int"):
            num = float if kind == "float" else int
            try:
                low, high = config.coerce(spec.get("low"), num, where), config.coerce(spec.get("high"), num, where)
            except FakegptError:
                raise FakegptError(f"{where}: low and high must be {kind}s") from None
            log_scale = bool(spec.get("log", False))
            if not low < high or (log_scale and low <= 0):
                raise FakegptError(f"{where}: need low < high{' and low > 0 on a log scale' if log_scale else ''}")
            out = {"type": kind, "low": low, "high": high, "log": log_scale}
            if spec.get("step") is not None:
                out["step"] = config.coerce(spec["step"], num, where)
            checked[name] = out
        else:
            raise FakegptError(f"{where}: type must be float, int or categorical, not {kind!r}")
    return checked


def load_sweep(path: str | Path | None) -> tuple[dict[str, Any], dict[str, Any], dict, list[dict[str, Any]]]:
    """Split a sweep YAML into (tune keys, base finetune keys, search space, enqueued trials)."""
    data = config.load_yaml(path) if path else {}
    space = data.pop("search_space", None)
    enqueue = data.pop("enqueue", None) or []
    base = data.pop("base", None) or {}
    if isinstance(base, str):  # the path of a finetune YAML, relative to the sweep file
        base_path = Path(base) if Path(base).is_absolute() or Path(base).exists() else Path(path).parent / base
        base = config.load_yaml(base_path)
    if not isinstance(base, dict):
        raise FakegptError(f"{path}: base must be a mapping of finetune keys or the path of a finetune YAML")
    space = check_search_space(space, str(path)) if space is not None else default_search_space()
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise FakegptError(f"{path}: enqueue must be a list of mappings (param: value)")
    for i, params in enumerate(enqueue):
        unknown = sorted(set(params) - set(space))
        if unknown:
            raise FakegptError(f"{path}: enqueue[{i}]: {unknown[0]!r} is not in the search space")
    return data, base, space, enqueue


def parse_args(argv: list[str]) -> tuple[TuneConfig, FinetuneConfig, dict, list[dict[str, Any]]]:
    """defaults < sweep YAML (--config) < flags, for the study settings and the base finetune config alike."""
    parser = config.ErrorRaisingParser(prog="fakegpt tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", metavar="SWEEP.yaml", help="a sweep YAML (experiments/sweeps/); flags override it")
    config.add_experiment_flag(parser)
    config.add_fields(parser.add_argument_group("study"), TuneConfig)
    config.add_fields(parser.add_argument_group("base finetune configuration (every trial)"), FinetuneConfig)
    ns = vars(parser.parse_args(config.normalise_flags(argv)))
    config.apply_experiment_flag(ns)
    path = ns.pop("config", None) or None
    tune_data, base_data, space, enqueue = load_sweep(path)
    source = str(path) if path else "config"
    if "out_dir" not in base_data and "out_dir" not in ns:
        base_data["out_dir"] = DEFAULT_OUT_DIR  # not finetune's default folder
    tune_cfg = config.from_dict(TuneConfig, tune_data, source)
    base = config.from_dict(FinetuneConfig, base_data, f"{source}: base")
    for cls in (TuneConfig, FinetuneConfig):
        hints = typing.get_type_hints(cls)
        over = {k: config.coerce(v, hints[k], config.flag_name(k)) for k, v in ns.items() if k in hints}
        if cls is TuneConfig:
            tune_cfg = dataclasses.replace(tune_cfg, **over)
        else:
            base = dataclasses.replace(base, **over)
    derived = sorted((set(base_data) | set(ns)) & set(DERIVED) - {"out_dir"})
    if derived:
        log.info(
            "tune: %s come from the token budget for every trial; the values given are not used", ", ".join(derived)
        )
    return tune_cfg, base, space, enqueue


def check(cfg: TuneConfig, base: FinetuneConfig, space: dict) -> None:
    """Check the study's settings and base config before any trial runs."""
    if cfg.pruner not in optuna_storage.PRUNERS:
        raise FakegptError(f"--pruner: expected one of {', '.join(optuna_storage.PRUNERS)}, got {cfg.pruner!r}")
    if cfg.sampler not in optuna_storage.SAMPLERS:
        raise FakegptError(f"--sampler: expected one of {', '.join(optuna_storage.SAMPLERS)}, got {cfg.sampler!r}")
    for name in ("n_trials", "token_budget", "n_evals"):
        if getattr(cfg, name) < 1:
            raise FakegptError(f"{config.flag_name(name)}: must be at least 1")
    if not cfg.study_name.strip():
        raise FakegptError("--study-name: must not be empty")
    if base.init_from == "resume":
        raise FakegptError("--init-from resume: a study starts every trial from the same model, not a resume")


# --- one trial -----------------------------------------------------------------------------------------------


def tokens_per_iter(cfg: FinetuneConfig) -> int:
    """Tokens per optimizer step: micro-batch x block x accumulation steps."""
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def trial_config(
    base: FinetuneConfig, params: dict[str, Any], budget: int, n_evals: int, out_dir: str, save_state: bool = False
) -> FinetuneConfig:
    """The finetune config of one trial: base + params, iterations and evaluations set by the token budget."""
    cfg = dataclasses.replace(base, **params)
    per_iter = tokens_per_iter(cfg)
    max_iters = max(1, math.ceil(budget / per_iter))
    updates: dict[str, Any] = {
        "max_iters": max_iters,
        # With budget a multiple of n_evals x tokens per iteration this lands exactly on every 1/n_evals.
        "eval_interval": max(1, max_iters // n_evals),
        # The base warmup keeps its length in tokens, whatever this trial's accumulation.
        "warmup_iters": min(max_iters, round(base.warmup_iters * tokens_per_iter(base) / per_iter)),
        "out_dir": out_dir,
        "always_save_checkpoint": False,
        "save_state": save_state,
    }
    if "lr_decay_iters" in {f.name for f in dataclasses.fields(FinetuneConfig)}:
        updates["lr_decay_iters"] = max_iters
    # A searched learning rate keeps the base's min_lr / learning_rate ratio (a fixed min_lr could exceed it).
    if "learning_rate" in params and "min_lr" not in params and base.learning_rate > 0:
        updates["min_lr"] = float(f"{cfg.learning_rate * base.min_lr / base.learning_rate:.6g}")
    return dataclasses.replace(cfg, **updates)


def grid_step(tokens_seen: int, budget: int, n_evals: int, final: bool) -> int:
    """The token count on the evaluation grid (k x budget / n_evals) that an evaluation reports at."""
    unit = budget / n_evals
    k = n_evals if final else min(n_evals, max(1, round(tokens_seen / unit)))
    return round(k * unit)


def suggest(trial: Any, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one trial's parameters from `space`."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "float":
            params[name] = trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"], step=spec.get("step"))
        else:
            params[name] = trial.suggest_int(
                name, spec["low"], spec["high"], log=spec["log"], step=spec.get("step") or 1
            )
    return params


class _Objective:
    """Runs one finetune per trial and reports its validation curve; the state lands on the MLflow run."""

    def __init__(self, cfg: TuneConfig, base: FinetuneConfig, space: dict, parent: Any, finetune_fn: Callable):
        self.cfg, self.base, self.space, self.parent, self.finetune_fn = cfg, base, space, parent, finetune_fn
        self.study_dir = Path(base.out_dir) / cfg.study_name
        self.run_ids: dict[int, str] = {}
        self.numbers: list[int] = []

    def __call__(self, trial: Any) -> float:
        import optuna

        self.numbers.append(trial.number)
        trial.set_user_attr("worker", optuna_storage.worker_id())
        trial.set_user_attr("mlflow_parent_run_id", self.parent.info.run_id)
        params = suggest(trial, self.space)
        out_dir = str(self.study_dir / f"trial-{trial.number:04d}")
        tcfg = trial_config(
            self.base, params, self.cfg.token_budget, self.cfg.n_evals, out_dir, save_state=self.cfg.trial_states
        )
        trial.set_user_attr("max_iters", tcfg.max_iters)
        trial.set_user_attr("tokens_per_iter", tokens_per_iter(tcfg))
        curve: list[tuple[int, float]] = []  # (grid step, val loss) as reported to Optuna

        tags = {tracking.TAG_STAGE: "trial", tracking.TAG_STUDY: self.cfg.study_name, tracking.TAG_TRIAL: trial.number}
        try:
            result = self.finetune_fn(
                tcfg,
                hooks=[self._pruning(trial, tcfg, params, curve)],
                nested=True,
                run_name=f"{self.cfg.study_name}-{trial.number:04d}",
                tags=tags,
            )
        except optuna.TrialPruned:
            self._finish(trial.number, "pruned", tcfg, params)
            raise
        except (Exception, KeyboardInterrupt) as exc:
            error = optuna_storage.INTERRUPTED if isinstance(exc, KeyboardInterrupt) else one_line(exc, with_type=True)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed by another worker
                trial.set_user_attr("error", error)
            self._finish(
                trial.number, "failed", tcfg, params, error=error, keep_status=isinstance(exc, KeyboardInterrupt)
            )
            raise
        finally:
            self._cleanup(tcfg)
        trial.set_user_attr("best_iter", result.best_iter)
        values = [v for _, v in curve if math.isfinite(v)]
        if not values:
            error = f"no finite validation loss within {self.cfg.token_budget} tokens"
            trial.set_user_attr("error", error)
            self._finish(trial.number, "failed", tcfg, params, error=error)
            raise FakegptError(error)
        self._finish(trial.number, "complete", tcfg, params)
        return min(values)

    def _pruning(self, trial: Any, tcfg: FinetuneConfig, params: dict[str, Any], curve: list) -> Hooks:
        """The trial's hook into finetune: each evaluation's loss reported to Optuna on the token grid (appended
        to `curve`), optuna.TrialPruned raised when the pruner says so; the trial's MLflow run tagged at its
        first evaluation."""
        import optuna

        def on_eval(ev: Any) -> None:
            if trial.number not in self.run_ids and tracking.active_run_id():
                self.run_ids[trial.number] = tracking.active_run_id()
                trial.set_user_attr("mlflow_run_id", self.run_ids[trial.number])
                tracking.log_params(
                    {"token_budget": self.cfg.token_budget, "n_evals": self.cfg.n_evals, "params": params},
                    prefix="tune.",
                )
            tracking.log_metrics({tracking.M_TUNE_VAL_LOSS: ev.val_loss}, step=int(ev.tokens_seen))
            if ev.iter >= tcfg.max_iters and not self.cfg.keep_checkpoints:
                self._remove_checkpoint(tcfg)  # before finetune logs it as an artifact of every trial
            if ev.iter == 0:
                return  # the starting point is the same for every trial: nothing to compare or prune on
            step = grid_step(ev.tokens_seen, self.cfg.token_budget, self.cfg.n_evals, ev.iter >= tcfg.max_iters)
            if curve and curve[-1][0] >= step:
                return
            curve.append((step, float(ev.val_loss)))
            trial.report(float(ev.val_loss), step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"val loss {ev.val_loss:.4f} at {ev.tokens_seen} tokens")

        # it reads (and at the end deletes) the evaluation's checkpoint: finetune waits for the write first
        return Hooks(on_eval=on_eval, reads_checkpoint=True)

    def _finish(
        self,
        number: int,
        state: str,
        tcfg: FinetuneConfig,
        params: dict[str, Any],
        error: str = "",
        keep_status: bool = False,
    ) -> None:
        """Tag the trial's MLflow run with Optuna's verdict (a run that never started gets one, for the record)."""
        tags = {tracking.TAG_TRIAL_STATE: state, **({tracking.TAG_ERROR: error} if error else {})}
        try:
            run_id = self.run_ids.get(number) or next(iter(_trial_run_ids(self.parent, number)), None)
            if run_id is None:
                with tracking.run(
                    stage="trial",
                    run_name=f"{self.cfg.study_name}-{number:04d}",
                    nested=True,
                    tags={tracking.TAG_STUDY: self.cfg.study_name, tracking.TAG_TRIAL: number, **tags},
                ):
                    tracking.log_params(config.to_dict(tcfg))
                    tracking.log_params({"params": params}, prefix="tune.")
                    run_id = tracking.active_run_id()
            tracking.update_run(run_id, tags=tags, status=None if keep_status else MLFLOW_STATUS[state])
        except Exception as exc:  # bookkeeping must never turn a trial's verdict into a crash of the study
            log.warning("trial %d: could not tag its MLflow run (%s)", number, exc)

    def _remove_checkpoint(self, tcfg: FinetuneConfig) -> None:
        if not self.cfg.keep_checkpoints:
            shutil.rmtree(Path(tcfg.out_dir) / CHECKPOINT_DIR, ignore_errors=True)
            shutil.rmtree(Path(tcfg.out_dir) / state_mod.STATE_DIR, ignore_errors=True)

    def _cleanup(self, tcfg: FinetuneConfig) -> None:
        self._remove_checkpoint(tcfg)
        if torch.cuda.is_available():  # hand a failed (e.g. out-of-memory) trial's GPU memory to the next one
            gc.collect()  # (a full collection takes a second with torch, transformers and mlflow loaded)
            torch.cuda.empty_cache()


def _trial_run_ids(parent: Any, number: int) -> list[str]:
    return tracking.find_run_ids(
        parent.info.experiment_id, {tracking.TAG_PARENT: parent.info.run_id, tracking.TAG_TRIAL: number}
    )


# --- outputs: plots, best config ------------------------------------------------------------------------------


def best_config_yaml(study: Any, cfg: TuneConfig, base: FinetuneConfig, path: Path) -> str:
    """The best trial's finetune configuration as YAML text (a header says how to run it from `path`)."""
    best = study.best_trial
    out_dir = str(Path(base.out_dir) / cfg.study_name / "best")
    tcfg = trial_config(base, best.params, cfg.token_budget, cfg.n_evals, out_dir, save_state=True)
    header = (
        f"# Best trial ({best.number}) of Optuna study {cfg.study_name!r}: best val loss {best.value:.4f} "
        f"within {cfg.token_budget} tokens; params {best.params}.\n"
        f"# Run it: fakegpt finetune --config {path}\n"
    )
    return header + yaml.safe_dump(config.to_dict(tcfg), sort_keys=False)


def check_same_budget(study: Any, cfg: TuneConfig) -> None:
    """Trials of one study must be comparable: the token budget and evaluation grid are fixed at creation."""
    fixed = {"token_budget": cfg.token_budget, "n_evals": cfg.n_evals}
    for key, value in fixed.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)
        elif study.user_attrs[key] != value:
            raise FakegptError(
                f"{config.flag_name(key)} {value}: study {cfg.study_name!r} was created with {key} "
                f"{study.user_attrs[key]}, and its trials are only comparable at that; use another --study-name"
            )


def _open_study(cfg: TuneConfig, url: str) -> Any:
    import optuna

    storage = optuna_storage.open_storage(url, cfg.heartbeat_interval, optuna_storage.on_heartbeat_stale)
    try:
        return optuna.create_study(
            storage=storage,
            study_name=cfg.study_name,
            direction="minimize",
            sampler=optuna_storage.make_sampler(cfg),
            pruner=optuna_storage.make_pruner(cfg),
            load_if_exists=True,
        )
    except Exception as exc:
        raise FakegptError(
            f"--storage {optuna_storage.display_url(url)}: cannot open study {cfg.study_name!r} "
            f"({one_line(exc, with_type=True)})"
        ) from None


# --- the study --------------------------------------------------------------------------------------------


def tune(
    cfg: TuneConfig,
    base: FinetuneConfig,
    search_space: dict | None = None,
    enqueue: list[dict[str, Any]] | None = None,
    *,
    finetune_fn: Callable | None = None,
) -> TuneResult:
    """Run (or continue) the study: cfg.n_trials trials of `finetune` on `base` + sampled parameters."""
    space = check_search_space(search_space, "search_space") if search_space is not None else default_search_space()
    check(cfg, base, space)
    finetune_checks.check(base)  # data folder, model, shapes: a mistake there would fail every trial, so fail once, now
    url = optuna_storage.storage_url(cfg.storage, base.out_dir)
    study = _open_study(cfg, url)
    check_same_budget(study, cfg)
    # Every worker judges the others' heartbeats by its own interval: they must all use the study's.
    interval = study.user_attrs.get("heartbeat_interval")
    if interval is None:
        study.set_user_attr("heartbeat_interval", cfg.heartbeat_interval)
    elif interval != cfg.heartbeat_interval:
        log.info("study %r uses --heartbeat-interval %s (set when it was created)", cfg.study_name, interval)
        cfg = dataclasses.replace(cfg, heartbeat_interval=interval)
        study = _open_study(cfg, url)
    for number in optuna_storage.fail_dead_local_trials(study):
        log.info("trial %d was left RUNNING by a dead worker: marked failed", number)
    for params in enqueue or []:
        if not optuna_storage.already_tried(study, params):
            study.enqueue_trial(params)
    log.info(
        "study %r in %s: %s",
        cfg.study_name,
        optuna_storage.display_url(url),
        optuna_storage.study_counts(study) or "new",
    )

    run_tags = {
        tracking.TAG_STUDY: cfg.study_name,
        tracking.TAG_MODEL: base.init_from,
        tracking.TAG_DATASET: Path(str(base.data_dir)).name,
    }
    with tracking.run(stage="tune", run_name=cfg.study_name, tags=run_tags) as parent:
        tracking.log_params(config.to_dict(cfg))
        tracking.log_params(config.to_dict(base), prefix="base.")
        tracking.log_dict(
            {"search_space": space, "enqueue": enqueue or [], "storage": optuna_storage.display_url(url)}, "sweep.yaml"
        )
        objective = _Objective(cfg, base, space, parent, finetune_fn or finetune)
        ran = objective.numbers  # the trials this invocation started

        def after_trial(_study: Any, trial: Any) -> None:
            if trial.value is not None:
                tracking.log_metrics({tracking.M_TUNE_TRIAL_VALUE: trial.value}, step=trial.number)

        deadline = time.monotonic() + cfg.timeout if cfg.timeout else None
        try:
            with optuna_storage.quiet_expected_failures():
                while len(ran) < cfg.n_trials and (deadline is None or time.monotonic() < deadline):
                    try:
                        study.optimize(
                            objective,
                            n_trials=cfg.n_trials - len(ran),
                            catch=(Exception,),
                            timeout=None if deadline is None else deadline - time.monotonic(),
                            callbacks=[after_trial],
                            gc_after_trial=False,
                        )
                    except ValueError as exc:  # Optuna cannot record a trial that another worker already failed
                        if "Cannot tell" not in str(exc):
                            raise
                        log.warning(
                            "trial %d was failed by another worker that missed its heartbeats (a stalled "
                            "worker, or workers with different --heartbeat-interval); going on",
                            ran[-1],
                        )
                        continue
                    break
        except KeyboardInterrupt:
            log.warning(
                "interrupted: study %r is saved in %s; run the same command to continue",
                cfg.study_name,
                optuna_storage.display_url(url),
            )
            raise
        result = _finish_study(study, cfg, base, space, url, ran, parent)
    failed = [t for t in study.get_trials(deepcopy=False) if t.number in ran and t.state.name == "FAIL"]
    if ran and len(failed) == len(ran):
        raise FakegptError(
            f"all {len(ran)} trials failed; trial {failed[0].number}: "
            f"{failed[0].user_attrs.get('error', 'see the log')}"
        )
    return result


def _finish_study(
    study: Any, cfg: TuneConfig, base: FinetuneConfig, space: dict, url: str, ran: list[int], parent: Any
) -> TuneResult:
    study_dir = Path(base.out_dir) / cfg.study_name
    states = {
        t.number: optuna_storage.STATE_NAMES.get(t.state.name, t.state.name.lower())
        for t in study.get_trials(deepcopy=False)
        if t.number in ran
    }
    counts = optuna_storage.study_counts(study)
    tracking.log_metrics({f"tune/{k}_trials": v for k, v in counts.items()})
    for plot in optuna_storage.save_plots(study, study_dir / "plots", space) if cfg.plots else []:
        tracking.log_artifact(plot, "plots")
    best_path: Path | None = None
    best_value, best_params, best_number = None, {}, None
    if counts.get("complete"):
        best = study.best_trial
        best_value, best_params, best_number = best.value, dict(best.params), best.number
        best_path = study_dir / "best.yaml"
        text = best_config_yaml(study, cfg, base, best_path)
        write_text(best_path, text)
        tracking.log_artifact(best_path)
        tracking.log_metrics({tracking.M_TUNE_BEST_VALUE: best_value})
        tracking.log_params({"trial": best_number, **best_params}, prefix="best.")
        print(text, end="")
    log.info(
        "study %r: %s; best %s",
        cfg.study_name,
        counts,
        f"trial {best_number} val loss {best_value:.4f} {best_params}" if best_value is not None else "none yet",
    )
    return TuneResult(
        cfg.study_name,
        optuna_storage.display_url(url),
        ran,
        states,
        best_value,
        best_params,
        best_number,
        best_path,
        parent.info.run_id,
    )


def main(argv: list[str]) -> int:
    """`fakegpt tune [flags]`; returns the exit status."""
    cfg, base, space, enqueue = parse_args(argv)
    result = tune(cfg, base, space, enqueue)
    if result.best_config is not None:
        print(
            f"best configuration: {result.best_config}  (fakegpt finetune --config {result.best_config})",
            file=sys.stderr,
        )
    return 0
