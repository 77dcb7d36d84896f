"""`fakegpt mixture` (the MLproject's `mixture` entry point): the original study's dose-response design.

For each anti-vaccine fraction f in `fractions` it prepares the mixture (`base_source` = 1 - f, `dose_source`
= f of the training tokens) once, then runs one cell per training seed (`seeds`): fine-tune, sample the prompt
grid, score the claims, each a child run (reused when a finished identical run exists, so a rerun only runs
what is missing). The parent run then carries the verdict (fakegpt/studies/dose_response.py): the declared
primary endpoint (by default the slope of the claim score on dose, with an interval over seeds and claims and
a p-value) first, then per dose the claim score, its paired difference from dose 0 and the seed-to-seed
spread, and its paired difference from the pretrained base model (scored once for the series; a scratch model has
none), and label rates with their per-prompt difference from dose 0 when a filled label sheet is given. Series
are defined in experiments/mixture/*.yaml, so a user edits YAML, not code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fakegpt import config, tracking
from fakegpt.data import prepare as prep
from fakegpt.data import sources
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.data.prepare import PrepareConfig
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_text
from fakegpt.measure.labels import aggregate, load_samples, paired_rates, read_sheet
from fakegpt.plots import figure
from fakegpt.studies import dose_response
from fakegpt.studies.cells import CellJob, run_cells, step_tags
from fakegpt.studies.dose_response import Cell
from fakegpt.studies.main import (
    PROJECT_DIR,
    MainConfig,
    check_steps,
    child_python,
    finetune_step_config,
    finetune_yaml,
    general_data_uri,
    is_demo,
    prepare_params,
    print_where,
    resolve_user_paths,
    score_params,
)
from fakegpt.studies.steps import run_or_find

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = [0.0, 0.09, 0.2, 0.33, 0.5, 0.8]
SLURM_CLUSTERS = ("slurm", "local")


@dataclass
class MixtureConfig(MainConfig):
    """`fakegpt mixture` settings: the dataset YAML, the dose fractions, and the chain's settings."""

    dataset: str = field(
        default="experiments/datasets/demo_mix.yaml",
        metadata={"help": "dataset YAML naming the base and dose sources (experiments/datasets/)"},
    )
    fractions: list[float] = field(
        default_factory=lambda: list(DEFAULT_FRACTIONS),
        metadata={"help": "dose fractions of the training tokens, comma list"},
    )
    dose_source: str = field(default="antivax", metadata={"help": "the dataset source whose share is varied"})
    base_source: str = field(default="general", metadata={"help": "the source that fills the rest"})
    series_name: str = field(default="antivax-dose", metadata={"help": "name for the series (MLflow tag)"})
    claim_eval_interval: int | None = field(
        default=0,
        metadata={
            "help": "score the claims during each dose's fine-tuning every N iterations (0 = at every evaluation): "
            "the absorption curves, claim/score against tokens seen for every dose on one chart; empty = off"
        },
    )
    register_models: bool = field(
        default=True,
        metadata={
            "help": "register each dose's best model in MLflow's registry as SERIES_NAME with alias dose-<percent> "
            "(models:/SERIES_NAME@dose-20 then works in sample and score)"
        },
    )
    allow_unequal_sizes: bool = field(
        default=False,
        metadata={
            "help": "run a series whose doses differ in training size (no max_train_tokens in the dataset YAML, "
            "or a dose that cannot fill it); by default refused: size would change with the share"
        },
    )
    label_sheet: str = field(
        default="",
        metadata={
            "help": "a filled label sheet (fakegpt labels export of this series' all_samples.parquet): adds label "
            "rates with Wilson 95% intervals per fraction to the dose-response table"
        },
    )
    labels: list[str] = field(
        default_factory=lambda: ["adopts", "refutes", "off-topic"],
        metadata={"help": "the label set of the sheet; the first one is the rate plotted against the dose"},
    )
    seeds: int = field(
        default=1,
        metadata={
            "help": "fine-tune seeds per dose (the finetune seed, seed + 1, ...: data order and initialisation): "
            "each dose x seed is a cell with its own runs, and intervals include seed-to-seed variation"
        },
    )
    endpoint: str = field(
        default="slope",
        metadata={
            "help": "the primary endpoint, declared before the series runs: slope (of the claim score on dose) | "
            "top_vs_zero (top dose minus dose 0); reported first, with its interval and p-value"
        },
    )
    endpoint_measure: str = field(
        default="score",
        metadata={"help": "the pair score the endpoint uses: score | score_sum | score_per_byte | score_full_mean"},
    )
    bootstrap: int = field(default=2000, metadata={"help": "two-level bootstrap resamples for the series' intervals"})
    workers: int = field(
        default=1,
        metadata={
            "help": "cells run at once, each in its own worker process (on its own GPU when there is one per "
            "worker, else sharing the CPU cores); 1 = one after another in this process"
        },
    )
    gpus_per_cell: int = field(
        default=1,
        metadata={
            "help": "GPUs per cell: a cell's fine-tune runs on this many under torchrun (finetune "
            "--nproc-per-node), so --workers N needs N x this many GPUs; on a machine without GPUs, processes per "
            "cell (gloo); 1 = one process"
        },
    )
    retries: int = field(
        default=1,
        metadata={"help": "times a failed cell is tried again (its finished steps are reused) before it is failed"},
    )
    report_only: bool = field(
        default=False,
        metadata={
            "help": "run nothing: rebuild the series' report from the cells that finished (whoever ran them); "
            "the cells still missing are listed"
        },
    )
    storage: str = field(
        default="",
        metadata={
            "help": "a storage shared by machines (PostgreSQL URL, or a SQLite/Optuna-journal file on a shared "
            "disk): every machine running the same command is a worker claiming the series' cells from it; "
            "empty = this process runs them all"
        },
    )
    heartbeat_interval: int = field(
        default=60,
        metadata={
            "help": "with --storage on SQL: seconds between a running cell's heartbeats; a cell silent for twice "
            "this is failed by the next worker and handed to another (0 = off)"
        },
    )
    slurm_array: int = field(
        default=0,
        metadata={"help": "submit N SLURM array tasks (submitit), each a worker of --storage; 0 = run here"},
    )
    slurm_options: str = field(
        default="",
        metadata={
            "help": "submitit executor parameters for the array, comma list of key=value, e.g. "
            "slurm_partition=gpu,gpus_per_node=1,timeout_min=720,slurm_array_parallelism=8"
        },
    )
    slurm_cluster: str = field(
        default="slurm",
        metadata={"help": "slurm | local (the array tasks as processes on this machine, waited for: a trial run)"},
    )
    slurm_folder: str = field(
        default="",
        metadata={"help": "submitit's folder (task logs, pickles); empty = OUT_ROOT/slurm/mixture-SERIES_NAME"},
    )


def dose_alias(fraction: float) -> str:
    """The registry alias of a dose's model: dose-20 for 0.2, dose-9 for 0.09 (aliases allow no dots)."""
    return f"dose-{fraction * 100:g}".replace(".", "_")


def mix_arg(cfg: MixtureConfig, fraction: float) -> str:
    """prepare's `--mix` value for one dose (`general=0.8,antivax=0.2`)."""
    return f"{cfg.base_source}={1.0 - fraction:.6g},{cfg.dose_source}={fraction:.6g}"


def check(cfg: MixtureConfig) -> None:
    """Check, before any step runs: the series' own settings, its dataset's source names, the label sheet, then
    every step's configuration."""
    if not cfg.fractions:
        raise FakegptError("--fractions: at least one fraction is required")
    for f in cfg.fractions:
        if not 0.0 <= f <= 1.0:
            raise FakegptError(f"--fractions: {f} is not between 0 and 1")
    dataset = Path(cfg.dataset) if Path(cfg.dataset).is_file() else PROJECT_DIR / cfg.dataset
    if not dataset.is_file():
        raise FakegptError(f"--dataset: {cfg.dataset}: no such file")
    dataset_cfg = prep.parse_args(["--config", str(dataset)])  # read once: the cap and the source names
    if not cfg.allow_unequal_sizes and not dataset_cfg.max_train_tokens:
        raise FakegptError(
            f"--dataset {cfg.dataset}: no max_train_tokens, so each dose would be as large as its scarcest source "
            "allows and size would change with the share; set max_train_tokens in the YAML (a size every dose can "
            "fill) or pass --allow-unequal-sizes true"
        )
    names = source_names(dataset_cfg)
    for flag, name in (("--dose-source", cfg.dose_source), ("--base-source", cfg.base_source)):
        if name not in names:
            raise FakegptError(f"{flag} {name!r}: no source of that name in {dataset} (sources: {', '.join(names)})")
    if cfg.dose_source == cfg.base_source:
        raise FakegptError(f"--dose-source and --base-source name the same source {cfg.dose_source!r}")
    if cfg.label_sheet and not Path(cfg.label_sheet).is_file():
        raise FakegptError(f"--label-sheet {cfg.label_sheet}: no such file")
    if not cfg.labels:
        raise FakegptError("--labels: give at least one label")
    if cfg.seeds < 1:
        raise FakegptError(f"--seeds: must be at least 1, got {cfg.seeds}")
    if len(set(cfg.fractions)) != len(cfg.fractions):
        raise FakegptError(f"--fractions: a fraction is listed twice ({cfg.fractions})")
    dose_response.check(cfg.endpoint, cfg.endpoint_measure)
    if cfg.workers < 1:
        raise FakegptError(f"--workers: must be at least 1, got {cfg.workers}")
    if cfg.gpus_per_cell < 1:
        raise FakegptError(f"--gpus-per-cell: must be at least 1, got {cfg.gpus_per_cell}")
    if cfg.retries < 0:
        raise FakegptError(f"--retries: must not be negative, got {cfg.retries}")
    if cfg.bootstrap < 100:
        raise FakegptError(f"--bootstrap: at least 100 resamples, got {cfg.bootstrap}")
    if cfg.heartbeat_interval < 0:
        raise FakegptError(f"--heartbeat-interval: must not be negative, got {cfg.heartbeat_interval}")
    if cfg.storage and cfg.workers > 1:
        raise FakegptError(
            f"--workers {cfg.workers}: with --storage each worker is its own command (one per machine or GPU, or "
            "--slurm-array N); leave --workers at 1"
        )
    if cfg.slurm_array < 0:
        raise FakegptError(f"--slurm-array: must not be negative, got {cfg.slurm_array}")
    if cfg.slurm_array and not cfg.storage:
        raise FakegptError("--slurm-array: the array's tasks share the cells through --storage; give one")
    if cfg.slurm_cluster not in SLURM_CLUSTERS:
        raise FakegptError(f"--slurm-cluster: expected one of {', '.join(SLURM_CLUSTERS)}, got {cfg.slurm_cluster!r}")
    check_steps(cfg, [mix_arg(cfg, f) for f in cfg.fractions])
    accumulation = finetune_step_config(cfg).gradient_accumulation_steps
    if accumulation % cfg.gpus_per_cell:  # said once here, not by every cell's launcher after the prepares
        raise FakegptError(
            f"--gpus-per-cell {cfg.gpus_per_cell}: the fine-tune's gradient_accumulation_steps {accumulation} must "
            "be a multiple of it (the accumulation steps are split across a cell's processes)"
        )


def check_one_method(cfg: MixtureConfig, method: str, experiment_id: str) -> None:
    """A series never mixes fine-tune methods (a LoRA update absorbs a dose differently from a full one): refuse
    a series name whose earlier fine-tunes used another method (runs from before the tag existed were full)."""
    found = tracking.tag_values(
        experiment_id,
        {tracking.TAG_STUDY: cfg.series_name, tracking.TAG_STAGE: "finetune"},
        tracking.TAG_METHOD,
        missing="full",
    )
    other = sorted(found - {method})
    if other:
        where = f"--finetune-config {finetune_yaml(cfg)}" if finetune_yaml(cfg) else "the finetune defaults"
        raise FakegptError(
            f"--series-name {cfg.series_name}: its doses were fine-tuned with method {other[0]}, this series uses "
            f"{method} ({where}); a series never mixes methods: give this one another --series-name, e.g. "
            f"{cfg.series_name}-{method}"
        )


def source_names(dataset: PrepareConfig) -> list[str]:
    """The source names of a dataset YAML's configuration (what --dose-source and --base-source must name)."""
    return [s.name for s in sources.build_sources([], dataset.sources, [], [])]


def check_dose_size(cfg: MixtureConfig, fraction: float, prepare_run: str) -> None:
    """Refuse a dose whose scarcest source could not fill the series' max_train_tokens (unless allowed)."""
    meta = DatasetMeta.from_dict(json.loads(tracking.download(f"runs:/{prepare_run}/{META_FILE}").read_text()))
    if meta.max_train_tokens_reached is False and not cfg.allow_unequal_sizes:
        raise FakegptError(
            f"dose {fraction:g}: {meta.train_tokens:,} train tokens, short of max_train_tokens "
            f"{meta.config.get('max_train_tokens'):,}: the scarcest source cannot fill it at this share; lower "
            "max_train_tokens in the dataset YAML or pass --allow-unequal-sizes true"
        )


def series_step(cfg: MixtureConfig, name: str, params: dict[str, Any], label: str, tags: dict[str, str]) -> str | None:
    """A step the whole series shares (the general held-out set, the base model's scores): run or reused, or
    with --report-only only found (None when it has not run)."""
    run_id, reused = run_or_find(PROJECT_DIR, name, params, cfg.env_manager, cfg.reuse, cfg.report_only)
    if run_id is None:
        return None
    tracking.update_run(run_id, tags={tracking.TAG_STUDY: cfg.series_name, **tags})
    print(f"[{label}] [{name}] {'reused' if reused else 'ran'} run {run_id}", flush=True)
    return run_id


def seed_list(cfg: MixtureConfig) -> list[int]:
    """The training seeds of every dose: the finetune configuration's seed, then the next ones."""
    first = finetune_step_config(cfg).seed
    return [first + i for i in range(cfg.seeds)]


def base_step(cfg: MixtureConfig, general: str) -> str | None:
    """Score the pretrained base model once for the whole series (on the claims and the general set), the
    reference every dose is compared with; None for a scratch model, which has no pretrained state."""
    if is_demo(cfg):
        return None
    params = score_params(cfg, cfg.init_from, "", general)
    return series_step(cfg, "score", params, "base", {tracking.TAG_ROLE: "base"})


def prepare_dose(cfg: MixtureConfig, fraction: float, lookup: bool = False) -> str | None:
    """One dose's prepared mixture (shared by its seeds): run or reused, its size checked; with `lookup` only
    found (None when it has not run)."""
    params = prepare_params(cfg, "", cfg.dataset, mix_arg(cfg, fraction))
    run_id, reused = run_or_find(PROJECT_DIR, "prepare", params, cfg.env_manager, cfg.reuse, lookup)
    if run_id is None:
        return None
    tracking.update_run(run_id, tags=step_tags(cfg, fraction, "", "prepare", None))
    print(f"[f={fraction:g}] [prepare] {'reused' if reused else 'ran'} run {run_id}", flush=True)
    if not lookup:
        check_dose_size(cfg, fraction, run_id)
    return run_id


def prepare_doses(cfg: MixtureConfig, lookup: bool = False) -> dict[float, str | None]:
    """Each dose's prepared mixture (one prepare run per fraction, shared by its seeds); with `lookup` only the
    finished ones are found (None where there is none yet)."""
    return {fraction: prepare_dose(cfg, fraction, lookup) for fraction in cfg.fractions}


def dose_jobs(cfg: MixtureConfig, method: str, fraction: float, prepare_run: str, general: str) -> list[CellJob]:
    """One dose's cells, seed by seed."""
    jobs = []
    for i, seed in enumerate(seed_list(cfg)):
        alias = dose_alias(fraction) + (f"-seed-{seed}" if i else "")
        jobs.append(
            CellJob(
                fraction=fraction,
                seed=seed,
                first_seed=i == 0,  # the very runs of a one-seed series
                prepare_run=prepare_run,
                general=general,
                method=method,
                register_as=cfg.series_name if cfg.register_models else "",
                alias=alias,
            )
        )
    return jobs


def cell_jobs(cfg: MixtureConfig, method: str, prepared: Mapping[float, str | None], general: str) -> list[CellJob]:
    """The grid of cells, dose by dose then seed by seed, for every dose whose mixture is prepared."""
    return [
        job
        for fraction in cfg.fractions
        if prepared.get(fraction) is not None
        for job in dose_jobs(cfg, method, fraction, str(prepared[fraction]), general)
    ]


def prepared_jobs(
    cfg: MixtureConfig, method: str, general: str, prepared: dict[float, str | None]
) -> Iterator[CellJob]:
    """Each dose's cells as soon as its mixture is prepared, so that with several workers the first doses' cells
    run while the later doses are prepared; `prepared` is filled in as it goes."""
    for fraction in cfg.fractions:
        run_id = prepared[fraction] = prepare_dose(cfg, fraction)
        if run_id is not None:
            yield from dose_jobs(cfg, method, fraction, run_id, general)


def run_series(cfg: MixtureConfig, method: str, general: str, parent_run: str) -> list[Cell]:
    """Per fraction one prepare, then per seed one finetune -> sample -> score cell (fine-tuned by `method`),
    every model measured on the general held-out set `general` too; `--report-only` finds, never runs. One
    process prepares every dose before the first cell (as a one-process series always has); with --workers the
    cells of a dose start once it is prepared, beside the next dose's prepare."""
    lookup = cfg.report_only
    prepared: dict[float, str | None] = {}
    jobs: Iterable[CellJob]
    if cfg.workers > 1 and not lookup:
        jobs = prepared_jobs(cfg, method, general, prepared)
    else:
        prepared = prepare_doses(cfg, lookup)
        jobs = cell_jobs(cfg, method, prepared, general)
    done = run_cells(cfg, jobs, parent_run, lookup)
    seeds = seed_list(cfg)
    missing = [Cell(f, s, status="missing") for f, run in prepared.items() if run is None for s in seeds]
    return done + missing


def dose_rows(cells: list[Cell], method: str, analysis: dose_response.Analysis | None) -> list[dict[str, Any]]:
    """One row per dose: the claim score (mean over its seeds) and its interval, the other measures' seed means,
    the paired difference from dose 0, and the first seed's runs (as a one-seed series has always had)."""
    rows = []
    for fraction in dict.fromkeys(c.fraction for c in cells):
        mine = [c for c in cells if c.fraction == fraction]

        def mean(name: str, mine: list[Cell] = mine) -> float | None:
            values = [c.metrics[name] for c in mine if c.metrics.get(name) is not None]
            return float(np.mean(values)) if values else None

        row: dict[str, Any] = {
            "fraction": fraction,
            "method": method,
            "seeds": [c.seed for c in mine],
            "score": mean(tracking.M_CLAIM_SCORE),
            "ci_low": mine[0].metrics.get(tracking.M_CLAIM_SCORE_LOW),
            "ci_high": mine[0].metrics.get(tracking.M_CLAIM_SCORE_HIGH),
            "false_win_rate": mean(tracking.M_CLAIM_WIN),
            "val_perplexity": mean(tracking.M_VAL_PPL),
            "general_perplexity": mean(tracking.M_GENERAL_PPL),
            "val_bits_per_byte": mean(tracking.M_VAL_BPB),
            "general_bits_per_byte": mean(tracking.M_GENERAL_BPB),
            **{f"{k}_run": v for k, v in mine[0].runs.items()},
        }
        if analysis is not None and len(mine) > 1:  # several seeds: the interval includes their spread
            d = analysis.dose_mean[fraction]
            row["ci_low"], row["ci_high"] = d.ci_low, d.ci_high
        if analysis is not None:
            v = analysis.versus_zero.get(fraction)
            row["seed_sd"] = analysis.seed_sd[fraction]
            if v is not None:
                row.update(vs_zero=v.mean, vs_zero_ci_low=v.ci_low, vs_zero_ci_high=v.ci_high, vs_zero_p=v.p_value)
            b = analysis.versus_base.get(fraction)
            if b is not None:
                row.update(vs_base=b.mean, vs_base_ci_low=b.ci_low, vs_base_ci_high=b.ci_high, vs_base_p=b.p_value)
        rows.append(row)
    return rows


def all_samples(cells: list[Cell], path: Path) -> Path:
    """Every cell's sample table in one file, with `fraction` and `seed` columns: what a label sheet is exported
    from."""
    tables = [
        load_samples(f"runs:/{c.runs['sample']}/samples.parquet").with_columns(
            fraction=pl.lit(c.fraction), seed=pl.lit(c.seed)
        )
        for c in cells
    ]
    with atomic_path(path, suffix=".parquet") as tmp:
        pl.concat(tables, how="diagonal_relaxed").write_parquet(tmp)
    return path


def add_label_rates(rows: list[dict[str, Any]], samples: Path, cfg: MixtureConfig) -> None:
    """Per fraction: the rate of the first label (e.g. `adopts`) with its Wilson interval, from a filled sheet,
    and its difference from the first dose's rate, paired by prompt (every dose answers the same prompts)."""
    labeled = read_sheet(cfg.label_sheet, load_samples(samples), cfg.labels, allow_unlabelled=True)
    rates = aggregate(labeled, cfg.labels, ["fraction"])
    first = rates.filter(rates["label"] == cfg.labels[0])
    found = {r["fraction"]: r for r in first.iter_rows(named=True)}
    reference = rows[0]["fraction"]
    paired = {}
    if reference in set(labeled["fraction"]):
        table = paired_rates(labeled, cfg.labels[:1], "fraction", reference)
        paired = {r["fraction"]: r for r in table.iter_rows(named=True)} if table.height else {}
    for row in rows:
        hit = found.get(row["fraction"])
        row["label"] = cfg.labels[0]
        row["label_rate"], row["label_ci_low"], row["label_ci_high"], row["labelled"] = (
            (hit["rate"], hit["ci_low"], hit["ci_high"], hit["n"]) if hit else (None, None, None, 0)
        )
        diff = paired.get(row["fraction"])
        if diff is not None:
            row.update(
                label_vs_zero=diff["difference"],
                label_vs_zero_ci_low=diff["ci_low"],
                label_vs_zero_ci_high=diff["ci_high"],
                label_vs_zero_p=diff["p_value"],
                label_vs_zero_prompts=diff["prompts"],
            )


def unfinished_line(unfinished: list[Cell]) -> str:
    """The cells that did not finish, in one line: `2 of the cells failed: f=0.5 seed=1338 (reason), ...`."""
    failed = [c for c in unfinished if c.status == "failed"]
    missing = [c for c in unfinished if c.status == "missing"]
    parts = []
    if failed:
        listed = ", ".join(f"f={c.fraction:g} seed={c.seed} ({c.error})" for c in failed)
        parts.append(f"{len(failed)} cell{'s' if len(failed) > 1 else ''} failed: {listed}")
    if missing:
        listed = ", ".join(f"f={c.fraction:g} seed={c.seed}" for c in missing)
        parts.append(f"{len(missing)} not run yet: {listed}")
    return "; ".join(parts)


def unfinished_markdown(unfinished: list[Cell]) -> str:
    """The report's list of cells left out of it, and why (empty when every cell finished)."""
    if not unfinished:
        return ""
    lines = ["", "Cells not in this report:", ""]
    for c in unfinished:
        why = f"failed after {c.attempts} attempt(s): {c.error}" if c.status == "failed" else "not run yet"
        lines.append(f"- dose {c.fraction:g}, seed {c.seed}: {why}")
    return "\n".join(lines) + "\n"


def dose_table_markdown(rows: list[dict[str, Any]], analysis: dose_response.Analysis | None = None) -> str:
    """The dose-response table (one row per fraction) as Markdown, the endpoint first when there is one."""
    return dose_response.table_markdown(rows, analysis)


def absorption_curves(cells: list[Cell]) -> dict[str, list[list[float]]]:
    """Per cell: [tokens seen, claim score] while its model trained (finetune --claims), from its run; keyed by
    the dose ("0.2"), with the seed after it from the second seed on ("0.2 seed 1338")."""
    curves = {}
    first = cells[0].seed if cells else 0
    for c in cells:
        scores = tracking.metric_history(c.runs["finetune"], tracking.M_CLAIM_SCORE)
        seen = dict(tracking.metric_history(c.runs["finetune"], tracking.M_TOKENS_SEEN))
        points = [[seen[step], value] for step, value in scores if step in seen]
        if points:
            curves[f"{c.fraction:g}" + (f" seed {c.seed}" if c.seed != first else "")] = points
    return curves


def plot_absorption(curves: dict[str, list[list[float]]], path: Path, title: str) -> None:
    """Claim score against tokens seen, one line per dose: how fast each dose's narrative is absorbed."""
    with figure(path, figsize=(7, 4.5)) as (_, ax):
        for dose, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"dose {dose}")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("claim score (log p false - log p true)")
        ax.set_title(f"absorption during fine-tuning: {title}")
        ax.legend()


def analyse(cfg: MixtureConfig, cells: list[Cell], base_run: str | None) -> dose_response.Analysis | None:
    """The endpoint and paired contrasts from the cells' pair tables, each dose against the base model's too
    when it was scored (None for a claims file with no pairs)."""
    tables = [dose_response.cell_pairs(c.runs["score"]) for c in cells]
    if len(set(c.fraction for c in cells)) < 2 or any(t.height == 0 for t in tables):
        return None
    base = (base_run, dose_response.cell_pairs(base_run)) if base_run else None
    return dose_response.analyse(cells, tables, cfg.endpoint, cfg.endpoint_measure, cfg.bootstrap, base)


def series_tags(cfg: MixtureConfig, method: str) -> dict[str, str]:
    """The tags of a series' parent run."""
    return {
        tracking.TAG_STUDY: cfg.series_name,
        tracking.TAG_METHOD: method,
        tracking.TAG_MODEL: cfg.init_from,
        tracking.TAG_DATASET: Path(cfg.dataset).stem,
    }


def logged_config(cfg: MixtureConfig) -> dict[str, Any]:
    """The series' settings as its parent run's parameters (a storage URL without its password)."""
    from fakegpt.studies.optuna_storage import display_url

    return config.to_dict(cfg) | {"storage": display_url(cfg.storage) if cfg.storage else ""}


def series_out(cfg: MixtureConfig) -> Path:
    """Where the series' report files are written (beside its steps' outputs)."""
    return PROJECT_DIR / cfg.out_root / f"mixture-{cfg.series_name}"


def report(
    cfg: MixtureConfig, method: str, grid: list[Cell], base_run: str | None
) -> tuple[list[dict[str, Any]], str, list[Cell]]:
    """The series' report from its cells, logged to the active (parent) run: the endpoint, the per-dose metrics,
    the dose-response table and plots, every cell's status. Returns (rows, table, failed cells)."""
    out = series_out(cfg)
    cells = [c for c in grid if c.status == "finished"]
    unfinished = [c for c in grid if c.status != "finished"]
    if not cells:
        raise FakegptError(f"series {cfg.series_name}: no cell has finished ({unfinished_line(unfinished)})")
    analysis = analyse(cfg, cells, base_run)
    rows = dose_rows(cells, method, analysis)
    samples = all_samples(cells, out / "all_samples.parquet")
    tracking.log_artifact(samples)
    if cfg.label_sheet:
        add_label_rates(rows, samples, cfg)
    if analysis is not None:  # the endpoint leads
        tracking.log_metrics(dose_response.metrics(analysis))
    for r in rows:
        step = round(r["fraction"] * 100)  # the UI charts metrics against step = percent dose
        tracking.log_metrics(
            {
                f"dose/{tracking.M_CLAIM_SCORE}": r["score"],
                f"dose/{tracking.paired_metric('score')}": r.get("vs_zero"),
                f"dose/{tracking.paired_metric('score')}_ci_low": r.get("vs_zero_ci_low"),
                f"dose/{tracking.paired_metric('score')}_ci_high": r.get("vs_zero_ci_high"),
                f"{tracking.M_DOSE_VS_BASE}": r.get("vs_base"),
                f"{tracking.M_DOSE_VS_BASE}_ci_low": r.get("vs_base_ci_low"),
                f"{tracking.M_DOSE_VS_BASE}_ci_high": r.get("vs_base_ci_high"),
                tracking.M_DOSE_SEED_SD: r.get("seed_sd"),
                f"dose/{tracking.M_CLAIM_WIN}": r["false_win_rate"],
                f"dose/{tracking.M_LABEL_RATE}/{r.get('label')}": r.get("label_rate"),
                f"dose/{tracking.PAIRED_PREFIX}{tracking.M_LABEL_RATE}/{r.get('label')}": r.get("label_vs_zero"),
            },
            step=step,
        )
    table = dose_table_markdown(rows, analysis) + unfinished_markdown(unfinished)
    write_text(out / "dose_response.md", table)
    tracking.log_dict(rows, "dose_response.json")
    series = {
        "analysis": analysis.to_dict() if analysis else None,
        "cells": [
            {"fraction": c.fraction, "seed": c.seed, "runs": c.runs, "status": c.status}
            | ({"error": c.error, "attempts": c.attempts} if c.status == "failed" else {})
            for c in grid
        ],
        "base_score_run": base_run,
    }
    tracking.log_dict(series, "series.json")
    tracking.log_artifact(out / "dose_response.md")
    title = f"{cfg.series_name} ({cfg.init_from}, {method})"
    dose_response.plot(rows, cells, analysis, out / "dose_response.png", title)
    tracking.log_artifact(out / "dose_response.png")
    curves = absorption_curves(cells)
    if curves:
        tracking.log_dict(curves, "absorption.json")
        plot_absorption(curves, out / "absorption.png", title)
        tracking.log_artifact(out / "absorption.png")
    return rows, table, [c for c in unfinished if c.status == "failed"]


def mixture(cfg: MixtureConfig) -> list[dict[str, Any]]:
    """Run the whole series as one MLflow parent run; returns one row per dose. With --storage (and not
    --report-only) this process is one worker of a series shared by machines; with --slurm-array the workers are
    submitted as a SLURM job array."""
    cfg = resolve_user_paths(cfg)
    check(cfg)
    method = finetune_step_config(cfg).method
    if cfg.slurm_array:
        from fakegpt.studies import slurm

        return slurm.submit_array(cfg)
    if cfg.storage and not cfg.report_only:
        from fakegpt.studies import shared_cells

        return shared_cells.run_worker(cfg, method)
    with (
        tracking.run(stage="mixture", run_name=None, tags=series_tags(cfg, method)) as parent,
        child_python(),
    ):
        check_one_method(cfg, method, parent.info.experiment_id)
        tracking.log_params(logged_config(cfg))
        general = general_data_uri(cfg, lambda name, params: series_step(cfg, name, params, "general", {}) or "")
        base_run = base_step(cfg, general)
        grid = run_series(cfg, method, general, parent.info.run_id)
        rows, table, failed = report(cfg, method, grid, base_run)
        parent_id = parent.info.run_id
        if failed:  # the report lists them; the series is not complete, so the run fails
            print(table)
            raise FakegptError(f"series {cfg.series_name}: {unfinished_line(failed)}; rerun it to retry them")
    print(table)
    print_where(parent_id, {f"f={r['fraction']:g}": (r["score_run"], False) for r in rows}, cfg.out_root)
    return rows


def main(argv: list[str]) -> int:
    """`fakegpt mixture [flags]`; returns the exit status."""
    cfg = config.parse(MixtureConfig, argv, prog="fakegpt mixture", description=__doc__.splitlines()[0])
    mixture(cfg)
    return 0
