"""The verdict of a dose series: its primary endpoint (a trend over dose) first, the per-dose numbers after.

Every cell of a series (dose x training seed) is scored on the same claim pairs. The cells' pair tables are
read back from their score runs, checked to be one yardstick (the same pairs, by a hash of their ids and
texts), and analysed together with the two-level bootstrap of fakegpt.stats.series_bootstrap: claims are
resampled once for every model (a claim that is easy for one model is easy for all), seeds within each dose.
The primary endpoint, declared in the series YAML, is by default the slope of the claim score on dose with
its interval and p-value; each dose's paired difference from dose 0 follows.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import polars as pl

from fakegpt import tracking
from fakegpt.errors import FakegptError
from fakegpt.plots import figure
from fakegpt.stats import Estimate, series_bootstrap

ENDPOINTS = {
    "slope": "slope of the claim score on dose (per unit of dose fraction)",
    "top_vs_zero": "claim score at the top dose minus dose 0",
}
MEASURES = ("score", "score_sum", "score_per_byte", "score_full_mean")


@dataclass
class Cell:
    """One finetune -> sample -> score chain of a series: a dose and a training seed, and its runs."""

    fraction: float
    seed: int
    runs: dict[str, str] = field(default_factory=dict)  # step -> run id
    metrics: dict[str, float] = field(default_factory=dict)  # the score run's metrics
    status: str = "finished"  # | "failed" (after its retries) | "missing" (a report of cells not yet run)
    error: str = ""  # why it failed, in one line
    attempts: int = 0


@dataclass
class Analysis:
    """The series' endpoint, its per-dose contrasts and what they were computed from."""

    endpoint: str
    measure: str
    primary: Estimate
    slope: Estimate
    versus_zero: dict[float, Estimate]  # dose -> dose mean minus dose 0's
    dose_mean: dict[float, Estimate]
    seed_sd: dict[float, float]
    seeds: dict[float, int]
    claims: int
    pairs: int
    yardstick: str  # sha256 of the pair ids and texts every cell was scored on
    training_noise: bool
    base_score: float | None = None  # the pretrained base model's mean score (None: no base, e.g. scratch)
    versus_base: dict[float, Estimate] = field(default_factory=dict)  # dose -> dose mean minus the base's

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("versus_zero", "dose_mean", "seed_sd", "seeds", "versus_base"):
            out[key] = {f"{k:g}": v for k, v in out[key].items()}
        return out


def check(endpoint: str, measure: str) -> None:
    """The declared endpoint and its measure are ones this module computes (checked before a series runs)."""
    if endpoint not in ENDPOINTS:
        raise FakegptError(f"--endpoint {endpoint}: expected one of {', '.join(ENDPOINTS)}")
    if measure not in MEASURES:
        raise FakegptError(f"--endpoint-measure {measure}: expected one of {', '.join(MEASURES)}")


def cell_pairs(score_run: str) -> pl.DataFrame:
    """A cell's pair table, from its score run (scores.parquet, one row per claim pair)."""
    return pl.read_parquet(tracking.download(f"runs:/{score_run}/scores.parquet"))


def yardstick(pairs: pl.DataFrame) -> str:
    """A hash of what a cell was measured on: its pairs' ids and texts."""
    rows = pairs.sort("pair_id").select("pair_id", "claim", "correction").rows()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def analyse(
    cells: list[Cell],
    tables: list[pl.DataFrame],
    endpoint: str,
    measure: str,
    n_boot: int,
    base: tuple[str, pl.DataFrame] | None = None,
) -> Analysis:
    """The endpoint and per-dose contrasts from every cell's pair table (in `cells` order; see `check`), and each
    dose against the pretrained base model when `base` (its score run id and pair table) is given."""
    tables = [t.sort("pair_id") for t in tables]
    marks = [yardstick(t) for t in tables]
    for cell, mark in zip(cells, marks, strict=True):
        if mark != marks[0]:
            raise FakegptError(
                f"dose {cell.fraction:g} seed {cell.seed}: score run {cell.runs.get('score')} was measured on other "
                f"claim pairs than dose {cells[0].fraction:g} seed {cells[0].seed}: a series needs one yardstick"
            )
    base_scores = None
    if base is not None:
        base_run, base_table = base[0], base[1].sort("pair_id")
        if yardstick(base_table) != marks[0]:
            raise FakegptError(
                f"the base model's score run {base_run} was measured on other claim pairs than the series' cells: "
                "a series needs one yardstick"
            )
        base_scores = base_table[measure].to_numpy()
    scores = np.stack([t[measure].to_numpy() for t in tables])
    boot = series_bootstrap(
        scores, tables[0]["claim_id"].to_list(), [c.fraction for c in cells], n_boot=n_boot, base=base_scores
    )
    doses = [float(d) for d in boot.doses]
    versus = {d: boot.versus(i) for i, d in enumerate(doses) if i > 0}
    slope = boot.slope()
    primary = slope if endpoint == "slope" else versus[doses[-1]]
    return Analysis(
        endpoint=endpoint,
        measure=measure,
        primary=primary,
        slope=slope,
        versus_zero=versus,
        dose_mean={d: boot.contrast(np.eye(len(doses))[i]) for i, d in enumerate(doses)},
        seed_sd={d: float(v) for d, v in zip(doses, boot.seed_spread, strict=True)},
        seeds={d: int(n) for d, n in zip(doses, boot.seeds_per_dose, strict=True)},
        claims=boot.claims,
        pairs=int(scores.shape[1]),
        yardstick=marks[0],
        training_noise=boot.training_noise,
        base_score=boot.base_point,
        versus_base={d: boot.versus_base(i) for i, d in enumerate(doses)} if base is not None else {},
    )


def endpoint_line(a: Analysis) -> str:
    """The verdict in one line: the declared endpoint with its interval and p-value, and what it resampled."""
    p = a.primary
    noise = (
        "training seeds and claims resampled"
        if a.training_noise
        else "claims resampled; one seed per dose, so training noise is NOT in the interval"
    )
    return (
        f"primary endpoint ({ENDPOINTS[a.endpoint]}, {a.measure}): {p.mean:+.4f}, 95% CI [{p.ci_low:+.4f}, "
        f"{p.ci_high:+.4f}], p = {p.p_value:.3g} ({p.method}; {noise})"
    )


def metrics(a: Analysis) -> dict[str, float]:
    """The parent run's endpoint metrics: dose/slope with its interval, the declared endpoint with its interval
    and its p-value (dose/p_value)."""
    return {  # tracking.log_metrics leaves out undefined (NaN) values
        tracking.M_DOSE_SLOPE: a.slope.mean,
        tracking.M_DOSE_SLOPE_LOW: a.slope.ci_low,
        tracking.M_DOSE_SLOPE_HIGH: a.slope.ci_high,
        tracking.M_DOSE_P: a.primary.p_value,
        tracking.M_DOSE_PRIMARY: a.primary.mean,
        tracking.M_DOSE_PRIMARY_LOW: a.primary.ci_low,
        tracking.M_DOSE_PRIMARY_HIGH: a.primary.ci_high,
    }


def fmt(v: Any) -> str:
    return (
        "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" if isinstance(v, float) else str(v)
    )


def table_markdown(rows: list[dict[str, Any]], analysis: Analysis | None = None) -> str:
    """The dose-response report: the endpoint line first, then one row per dose (as Markdown)."""
    labelled = any(r.get("labelled") for r in rows)
    paired = analysis is not None
    # val perplexity is on each dose's own validation split; general perplexity on one held-out set for all
    head = "| fraction | method | claim score | 95% CI |"
    rule = "|---:|---|---:|---|"
    if paired:
        head += " seeds | seed SD | vs dose 0 (paired) | 95% CI | p |"
        rule += "---:|---:|---:|---|---:|"
    based = analysis is not None and bool(analysis.versus_base)
    if based:
        head += " vs base model (paired) | 95% CI | p |"
        rule += "---:|---|---:|"
    # perplexity is per token, so it compares models with one tokenizer; bits per byte compares any
    head += " false-claim win rate | val perplexity | general perplexity | general bits/byte |"
    rule += "---:|---:|---:|---:|"
    if labelled:
        head += f" {rows[0]['label']} rate | 95% CI (Wilson, prompts as clusters) | labelled |"
        head += " vs dose 0 (paired by prompt) | 95% CI |"
        rule += "---:|---|---:|---:|---|"
    lines = [endpoint_line(analysis), ""] if analysis is not None else []
    if analysis is not None and based:
        lines[1:1] = [f"base model (pretrained, not fine-tuned): claim score {fmt(analysis.base_score)}"]
    lines += [head, rule]
    for r in rows:
        line = (
            f"| {r['fraction']:g} | {r.get('method', 'full')} | {fmt(r['score'])} | "
            f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}] |"
        )
        if analysis is not None:  # paired
            v = analysis.versus_zero.get(r["fraction"])
            line += f" {analysis.seeds[r['fraction']]} | {fmt(analysis.seed_sd[r['fraction']])} |"
            line += f" {fmt(v.mean)} | [{fmt(v.ci_low)}, {fmt(v.ci_high)}] | {v.p_value:.3g} |" if v else " | | |"
        if analysis is not None and based:
            b = analysis.versus_base[r["fraction"]]
            line += f" {fmt(b.mean)} | [{fmt(b.ci_low)}, {fmt(b.ci_high)}] | {b.p_value:.3g} |"
        line += f" {fmt(r['false_win_rate'])} | {fmt(r['val_perplexity'])} | {fmt(r.get('general_perplexity'))} |"
        line += f" {fmt(r.get('general_bits_per_byte'))} |"
        if labelled:
            interval = f"[{fmt(r['label_ci_low'])}, {fmt(r['label_ci_high'])}]"
            line += f" {fmt(r['label_rate'])} | {interval} | {r['labelled']} |"
            paired_ci = f"[{fmt(r.get('label_vs_zero_ci_low'))}, {fmt(r.get('label_vs_zero_ci_high'))}]"
            line += f" {fmt(r.get('label_vs_zero'))} | {paired_ci} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], cells: list[Cell], analysis: Analysis | None, path: Any, title: str) -> None:
    """Claim score against dose: every seed's model as a dot, the dose means with their intervals, the fitted
    slope (the endpoint) as a line; the label rate beside it when labelled."""
    pts = [r for r in rows if r["score"] is not None]
    xs = [r["fraction"] for r in pts]
    ys = [r["score"] for r in pts]
    lo = [r["score"] - (r["ci_low"] if r["ci_low"] is not None else r["score"]) for r in pts]
    hi = [(r["ci_high"] if r["ci_high"] is not None else r["score"]) - r["score"] for r in pts]
    labelled = [r for r in rows if r.get("label_rate") is not None]
    size = (11, 4) if labelled else (6, 4)
    with figure(path, nrows=1, ncols=2 if labelled else 1, figsize=size, squeeze=False) as (_, axes):
        ax = axes[0][0]
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=4, label="dose mean, 95% CI")
        seeded = [c for c in cells if c.metrics.get(tracking.M_CLAIM_SCORE) is not None]
        if len({c.seed for c in seeded}) > 1:
            ax.scatter(
                [c.fraction for c in seeded],
                [c.metrics[tracking.M_CLAIM_SCORE] for c in seeded],
                s=12,
                color="grey",
                alpha=0.7,
                label="one seed",
            )
        if analysis is not None and xs:
            s = analysis.slope
            grid = np.array([min(xs), max(xs)])
            centre = float(np.mean(xs))
            ax.plot(
                grid,
                float(np.mean(ys)) + s.mean * (grid - centre),
                ls=":",
                color="tab:orange",
                label=f"slope {s.mean:+.3f} [{s.ci_low:+.3f}, {s.ci_high:+.3f}]",
            )
        if analysis is not None and analysis.base_score is not None:
            ax.axhline(analysis.base_score, color="tab:green", lw=1.0, ls="-.", label="base model (not fine-tuned)")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("dose fraction of training tokens")
        ax.set_ylabel("claim score: log p(false) - log p(true)")
        ax.set_title(title)
        ax.legend(fontsize=7)
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
