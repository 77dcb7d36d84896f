"""`fakegpt mixture` (the MLproject's `mixture` entry point): the original study's dose-response design.

For each anti-vaccine fraction f in `fractions` it prepares the mixture (`base_source` = 1 - f, `dose_source`
= f of the training tokens), fine-tunes, samples the prompt grid and scores the claims, each as a child run
(reused when a finished identical run exists). The parent run then carries the dose-response table and
plot: the claim score with its 95% interval (and label rates, when a filled label sheet is given) against f.
Series are defined in experiments/mixture/*.yaml, so a user edits YAML, not code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from fakegpt import config, tracking
from fakegpt.data import prepare as prep
from fakegpt.data import sources
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.data.prepare import PrepareConfig
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_text
from fakegpt.measure.labels import load_samples, rates_from_sheet
from fakegpt.plots import figure
from fakegpt.studies.pipeline import (
    PROJECT_DIR,
    PipelineConfig,
    check_steps,
    child_python,
    finetune_params,
    finetune_step_config,
    finetune_yaml,
    general_data_uri,
    prepare_params,
    print_where,
    resolve_user_paths,
    sample_params,
    score_params,
)
from fakegpt.studies.steps import run_step

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = [0.0, 0.09, 0.2, 0.33, 0.5, 0.8]


@dataclass
class SeriesConfig(PipelineConfig):
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


def dose_alias(fraction: float) -> str:
    """The registry alias of a dose's model: dose-20 for 0.2, dose-9 for 0.09 (aliases allow no dots)."""
    return f"dose-{fraction * 100:g}".replace(".", "_")


def mix_arg(cfg: SeriesConfig, fraction: float) -> str:
    """prepare's `--mix` value for one dose (`general=0.8,antivax=0.2`)."""
    return f"{cfg.base_source}={1.0 - fraction:.6g},{cfg.dose_source}={fraction:.6g}"


def validate(cfg: SeriesConfig) -> None:
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
    check_steps(cfg, [mix_arg(cfg, f) for f in cfg.fractions])


def check_one_method(cfg: SeriesConfig, method: str, experiment_id: str) -> None:
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


def check_dose_size(cfg: SeriesConfig, fraction: float, prepare_run: str) -> None:
    """Refuse a dose whose scarcest source could not fill the series' max_train_tokens (unless allowed)."""
    meta = DatasetMeta.from_dict(json.loads(tracking.download(f"runs:/{prepare_run}/{META_FILE}").read_text()))
    if meta.max_train_tokens_reached is False and not cfg.allow_unequal_sizes:
        raise FakegptError(
            f"dose {fraction:g}: {meta.train_tokens:,} train tokens, short of max_train_tokens "
            f"{meta.config.get('max_train_tokens'):,}: the scarcest source cannot fill it at this share; lower "
            "max_train_tokens in the dataset YAML or pass --allow-unequal-sizes true"
        )


def _general_step(cfg: SeriesConfig, name: str, params: dict[str, Any]) -> str:
    """Prepare the general held-out set once for the whole series (every dose is measured on these bins)."""
    run_id, reused = run_step(PROJECT_DIR, name, params, cfg.env_manager, reuse=cfg.reuse)
    tracking.update_run(run_id, tags={tracking.TAG_STUDY: cfg.series_name})
    print(f"[general] [{name}] {'reused' if reused else 'ran'} run {run_id}", flush=True)
    return run_id


def run_series(cfg: SeriesConfig, method: str) -> list[dict[str, Any]]:
    """One prepare -> finetune -> sample -> score chain per fraction (fine-tuned by `method`); one row each."""
    rows = []
    general = general_data_uri(cfg, lambda name, params: _general_step(cfg, name, params))
    for fraction in cfg.fractions:
        steps: dict[str, str] = {}

        def step(name: str, params: dict[str, Any], fraction: float = fraction, steps: dict = steps) -> str:
            run_id, reused = run_step(PROJECT_DIR, name, params, cfg.env_manager, reuse=cfg.reuse)
            tags = {tracking.TAG_FRACTION: f"{fraction:g}", tracking.TAG_STUDY: cfg.series_name}
            if name in ("sample", "score"):  # a model's runs (finetune tags itself; prepare is method-free)
                tags[tracking.TAG_METHOD] = method
            tracking.update_run(run_id, tags=tags)
            steps[name] = run_id
            print(f"[f={fraction:g}] [{name}] {'reused' if reused else 'ran'} run {run_id}", flush=True)
            return run_id

        prep = step("prepare", prepare_params(cfg, "", cfg.dataset, mix_arg(cfg, fraction)))
        check_dose_size(cfg, fraction, prep)
        data_uri = f"runs:/{prep}/data"
        register = (
            {"register_as": cfg.series_name, "register_alias": dose_alias(fraction)} if cfg.register_models else {}
        )
        tuned = step("finetune", finetune_params(cfg, data_uri, register))
        model = f"runs:/{tuned}/checkpoint"
        step("sample", sample_params(cfg, model))
        scored = step("score", score_params(cfg, model, data_uri, general))
        metrics = tracking.get_run(scored).data.metrics
        rows.append(
            {
                "fraction": fraction,
                "method": method,
                "score": metrics.get(tracking.M_CLAIM_SCORE),
                "ci_low": metrics.get(tracking.M_CLAIM_SCORE_LOW),
                "ci_high": metrics.get(tracking.M_CLAIM_SCORE_HIGH),
                "false_win_rate": metrics.get(tracking.M_CLAIM_WIN),
                "val_perplexity": metrics.get(tracking.M_VAL_PPL),
                "general_perplexity": metrics.get(tracking.M_GENERAL_PPL),
                **{f"{k}_run": v for k, v in steps.items()},
            }
        )
    return rows


def all_samples(rows: list[dict[str, Any]], path: Path) -> Path:
    """Every fraction's sample table in one file, with a `fraction` column: what a label sheet is exported from."""
    tables = [
        load_samples(f"runs:/{r['sample_run']}/samples.parquet").with_columns(fraction=pl.lit(r["fraction"]))
        for r in rows
    ]
    with atomic_path(path, suffix=".parquet") as tmp:
        pl.concat(tables, how="diagonal_relaxed").write_parquet(tmp)
    return path


def add_label_rates(rows: list[dict[str, Any]], samples: Path, cfg: SeriesConfig) -> None:
    """Per fraction: the rate of the first label (e.g. `adopts`) with its Wilson interval, from a filled sheet."""
    rates = rates_from_sheet(samples, cfg.label_sheet, cfg.labels, by=["fraction"], allow_unlabelled=True)
    first = rates.filter(rates["label"] == cfg.labels[0])
    found = {r["fraction"]: r for r in first.iter_rows(named=True)}
    for row in rows:
        hit = found.get(row["fraction"])
        row["label"] = cfg.labels[0]
        row["label_rate"], row["label_ci_low"], row["label_ci_high"], row["labelled"] = (
            (hit["rate"], hit["ci_low"], hit["ci_high"], hit["n"]) if hit else (None, None, None, 0)
        )


def dose_table_markdown(rows: list[dict[str, Any]]) -> str:
    """The dose-response table (one row per fraction) as Markdown."""

    def fmt(v: Any) -> str:
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    labelled = any(r.get("labelled") for r in rows)
    # val perplexity is on each dose's own validation split; general perplexity on one held-out set for all
    head = "| fraction | method | claim score | 95% CI | false-claim win rate | val perplexity | general perplexity |"
    rule = "|---:|---|---:|---|---:|---:|---:|"
    if labelled:
        head += f" {rows[0]['label']} rate | 95% CI (Wilson, prompts as clusters) | labelled |"
        rule += "---:|---|---:|"
    lines = [head, rule]
    for r in rows:
        line = (
            f"| {r['fraction']:g} | {r.get('method', 'full')} | {fmt(r['score'])} | "
            f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] | "
            f"{fmt(r['false_win_rate'])} | {fmt(r['val_perplexity'])} | {fmt(r.get('general_perplexity'))} |"
        )
        if labelled:
            interval = f"[{fmt(r['label_ci_low'])}, {fmt(r['label_ci_high'])}]"
            line += f" {fmt(r['label_rate'])} | {interval} | {r['labelled']} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot_dose_response(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Claim score (and label rate, when labelled) against dose fraction, written to `path`."""
    pts = [r for r in rows if r["score"] is not None]
    xs = [r["fraction"] for r in pts]
    ys = [r["score"] for r in pts]
    lo = [r["score"] - (r["ci_low"] if r["ci_low"] is not None else r["score"]) for r in pts]
    hi = [(r["ci_high"] if r["ci_high"] is not None else r["score"]) - r["score"] for r in pts]
    labelled = [r for r in rows if r.get("label_rate") is not None]
    size = (11, 4) if labelled else (6, 4)
    with figure(path, nrows=1, ncols=2 if labelled else 1, figsize=size, squeeze=False) as (_, axes):
        ax = axes[0][0]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("dose fraction of training tokens")
        ax.set_ylabel("claim score: log p(false) - log p(true)")
        ax.set_title(title)
        if labelled:
            ax2 = axes[0][1]
            rate = [r["label_rate"] for r in labelled]
            ax2.errorbar(
                [r["fraction"] for r in labelled],
                rate,
                marker="s",
                capsize=4,
                color="tab:red",
                yerr=[
                    [v - r["label_ci_low"] for v, r in zip(rate, labelled, strict=True)],
                    [r["label_ci_high"] - v for v, r in zip(rate, labelled, strict=True)],
                ],
            )
            ax2.set_xlabel("dose fraction of training tokens")
            ax2.set_ylabel(f"share of samples labelled '{labelled[0]['label']}'")
            ax2.set_ylim(0, 1)


def absorption_curves(rows: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Per dose: [tokens seen, claim score] while its model trained (finetune --claims), from its run."""
    curves = {}
    for r in rows:
        scores = tracking.metric_history(r["finetune_run"], tracking.M_CLAIM_SCORE)
        seen = dict(tracking.metric_history(r["finetune_run"], tracking.M_TOKENS_SEEN))
        points = [[seen[step], value] for step, value in scores if step in seen]
        if points:
            curves[f"{r['fraction']:g}"] = points
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


def mixture(cfg: SeriesConfig) -> list[dict[str, Any]]:
    """Run the whole series as one MLflow parent run; returns one row per dose."""
    cfg = resolve_user_paths(cfg)
    validate(cfg)
    method = finetune_step_config(cfg).method
    tags = {
        tracking.TAG_STUDY: cfg.series_name,
        tracking.TAG_METHOD: method,
        tracking.TAG_MODEL: cfg.init_from,
        tracking.TAG_DATASET: Path(cfg.dataset).stem,
    }
    out = PROJECT_DIR / cfg.out_root / f"mixture-{cfg.series_name}"
    with (
        tracking.run(stage="mixture", run_name=None, tags=tags) as parent,
        child_python(),
    ):
        check_one_method(cfg, method, parent.info.experiment_id)
        tracking.log_params(config.to_dict(cfg))
        rows = run_series(cfg, method)
        samples = all_samples(rows, out / "all_samples.parquet")
        tracking.log_artifact(samples)
        if cfg.label_sheet:
            add_label_rates(rows, samples, cfg)
        for r in rows:
            step = round(r["fraction"] * 100)  # the UI charts metrics against step = percent dose
            tracking.log_metrics(
                {
                    f"dose/{tracking.M_CLAIM_SCORE}": r["score"],
                    f"dose/{tracking.M_CLAIM_WIN}": r["false_win_rate"],
                    f"dose/{tracking.M_LABEL_RATE}/{r.get('label')}": r.get("label_rate"),
                },
                step=step,
            )
        table = dose_table_markdown(rows)
        write_text(out / "dose_response.md", table)
        tracking.log_dict(rows, "dose_response.json")
        tracking.log_artifact(out / "dose_response.md")
        plot_dose_response(rows, out / "dose_response.png", f"{cfg.series_name} ({cfg.init_from}, {method})")
        tracking.log_artifact(out / "dose_response.png")
        curves = absorption_curves(rows)
        if curves:
            tracking.log_dict(curves, "absorption.json")
            plot_absorption(curves, out / "absorption.png", f"{cfg.series_name} ({cfg.init_from}, {method})")
            tracking.log_artifact(out / "absorption.png")
        parent_id = parent.info.run_id
    print(table)
    print_where(parent_id, {f"f={r['fraction']:g}": (r["score_run"], False) for r in rows}, cfg.out_root)
    return rows


def main(argv: list[str]) -> int:
    """`fakegpt mixture [flags]`; returns the exit status."""
    cfg = config.parse(SeriesConfig, argv, prog="fakegpt mixture", description=__doc__.splitlines()[0])
    mixture(cfg)
    return 0
