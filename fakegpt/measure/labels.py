"""`fakegpt labels export | import | aggregate | auto`: labels for sampled completions, by people or a judge.

    fakegpt labels export --samples out/sample --sheet sheet.csv          # CSV with an empty `label` column
    fakegpt labels import --samples out/sample --sheet sheet.csv          # check the filled sheet -> labeled.parquet
    fakegpt labels aggregate --samples out/sample --sheet sheet.csv       # rates + Wilson 95% CIs, table + plot
    fakegpt labels auto --samples out/sample --judge NLI_FOLDER --sheet auto.csv [--human sheet.csv]  # judge.py

A sheet row is one sample, keyed by `sample_id`; by default the sheet is blind (no model or temperature
columns) and shuffled, so a labeller cannot tell base from fine-tuned. Labels are `adopts`, `refutes`,
`off-topic` unless `--labels` says otherwise. Problems in a filled sheet (unknown labels, rows that match no
sample or whose text was changed, duplicates) are all reported at once with the sheet's row numbers (row 1 is
the header, as a spreadsheet shows it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_table
from fakegpt.measure.judge import AutoConfig, auto, format_kappa
from fakegpt.plots import figure
from fakegpt.stats import cluster_estimate, clustered_wilson

log = logging.getLogger(__name__)

DEFAULT_LABELS = ["adopts", "refutes", "off-topic"]
DEFAULT_BY = ["model", "temperature", "framing", "language"]
SHEET_COLUMNS = ["sample_id", "topic", "framing", "language", "prompt", "completion", "label", "note"]
UNBLIND_COLUMNS = ["model", "temperature"]
MAX_REPORTED = 25  # problems listed in one error message


@dataclass
class ExportConfig:
    """`fakegpt labels export`: write an annotation sheet from a sample table."""

    samples: str = field(
        default="out/sample",
        metadata={"help": "a sample run's out_dir, its samples.parquet / samples.jsonl, or runs:/<id>/samples.parquet"},
    )
    sheet: str = field(default="out/labels/sheet.csv", metadata={"help": "the annotation sheet (CSV) to write"})
    blind: bool = field(default=True, metadata={"help": "leave out the model and temperature columns"})
    shuffle: bool = field(default=True, metadata={"help": "shuffle the rows (seeded) so models are interleaved"})
    seed: int = field(default=0, metadata={"help": "shuffle seed"})
    force: bool = field(
        default=False, metadata={"help": "replace an existing sheet (it may hold labels people entered)"}
    )


@dataclass
class ImportConfig:
    """`fakegpt labels import`: join a filled sheet back to its samples and check every label."""

    samples: str = field(default="out/sample", metadata={"help": "the samples the sheet was exported from"})
    sheet: str = field(default="out/labels/sheet.csv", metadata={"help": "the filled annotation sheet (CSV)"})
    labels: list[str] = field(default_factory=lambda: list(DEFAULT_LABELS), metadata={"help": "allowed labels"})
    allow_unlabelled: bool = field(default=False, metadata={"help": "skip rows with an empty label"})
    out_dir: str = field(default="out/labels", metadata={"help": "where labeled.parquet / labeled.csv go"})


@dataclass
class AggregateConfig(ImportConfig):
    """`fakegpt labels aggregate`: label rates with Wilson intervals per group."""

    by: list[str] = field(default_factory=lambda: list(DEFAULT_BY), metadata={"help": "columns to group by"})
    reference: str = field(
        default="",
        metadata={
            "help": "COLUMN=VALUE (e.g. model=gpt2): every other value of COLUMN is compared with it prompt by "
            "prompt, each label's rate as a paired difference with a 95% interval over prompts; empty = none"
        },
    )


def load_samples(spec: str | Path) -> pl.DataFrame:
    """A sample table from a folder (its samples.parquet), a .parquet / .jsonl file or an MLflow artifact URI."""
    path = tracking.local_path(str(spec)) if tracking.is_artifact_uri(str(spec)) else Path(spec)
    if path.is_dir():
        path = path / "samples.parquet"
    if not path.is_file():
        raise FakegptError(f"{path}: no such file (give a sample out_dir or its samples.parquet/jsonl)")
    try:
        table = pl.read_ndjson(path) if path.suffix == ".jsonl" else pl.read_parquet(path)
    except Exception as exc:
        raise FakegptError(f"{path}: cannot read the sample table ({exc})") from None
    missing = [c for c in ("sample_id", "prompt", "completion") if c not in table.columns]
    if missing:
        raise FakegptError(f"{path}: not a sample table (no column {missing[0]!r})")
    return table


def check_sheet_free(path: str | Path, force: bool = False) -> None:
    """A sheet people may have filled in is never replaced without --force."""
    path = Path(path)
    if path.is_dir():
        raise FakegptError(f"--sheet {path}: is a folder; give a CSV file name")
    if path.exists() and not force:
        raise FakegptError(
            f"--sheet {path}: already exists (it may hold labels people entered); use --force to replace it"
        )


def export_sheet(
    samples: pl.DataFrame,
    path: str | Path,
    blind: bool = True,
    shuffle: bool = True,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write the annotation sheet: one row per sample, `label` and `note` empty. An existing sheet is replaced
    only with `force`, and then only once the new one is complete."""
    check_sheet_free(path, force)
    context = [c for c in SHEET_COLUMNS[1:-2] if c in samples.columns]
    unblind = [] if blind else [c for c in UNBLIND_COLUMNS if c in samples.columns]
    sheet = samples.select(["sample_id"] + unblind + context).with_columns(label=pl.lit(""), note=pl.lit(""))
    if shuffle:
        sheet = sheet.sample(fraction=1.0, shuffle=True, seed=seed)
    path = Path(path)
    with atomic_path(path, suffix=".csv", replace=force) as tmp:
        sheet.write_csv(tmp)
    return path


def _same_text(text: str | None) -> str:
    """Text as compared between sheet and samples: spreadsheets may turn \\n into \\r\\n and trim ends."""
    return (text or "").replace("\r\n", "\n").replace("\r", "\n").strip()


def read_sheet(
    path: str | Path, samples: pl.DataFrame, labels: list[str] = DEFAULT_LABELS, allow_unlabelled: bool = False
) -> pl.DataFrame:
    """The samples joined with their labels from a filled sheet; every problem is reported with its row."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8-sig") as fh:
            header = fh.readline()
        # spreadsheets in pt-BR locales save CSV with ';'
        separator = ";" if header.count(";") > header.count(",") else ","
        sheet = pl.read_csv(
            path, infer_schema=False, separator=separator, empty_string_is_null=False, encoding="utf8-lossy"
        )
    except FileNotFoundError:
        raise FakegptError(f"{path}: no such file") from None
    except Exception as exc:
        raise FakegptError(f"{path}: not a readable CSV sheet ({exc})") from None
    sheet = sheet.rename({c: c.lstrip("\ufeff").strip() for c in sheet.columns})  # a BOM from Excel
    for column in ("sample_id", "label"):
        if column not in sheet.columns:
            raise FakegptError(f"{path}: no {column!r} column (export a sheet with `fakegpt labels export`)")
    allowed = [lab.strip().lower() for lab in labels]
    by_id = {row["sample_id"]: row for row in samples.iter_rows(named=True)}
    problems: list[str] = []
    seen: dict[str, int] = {}
    kept: dict[str, str] = {}
    source: dict[str, str] = {}  # who labelled each row: "human", or "judge:<model>" for `labels auto` sheets
    for index, row in enumerate(sheet.iter_rows(named=True)):
        line = index + 2  # row 1 is the header
        sid = (row["sample_id"] or "").strip()
        label = (row["label"] or "").strip().lower()
        sample = by_id.get(sid)
        if sample is None:
            problems.append(f"row {line}: sample_id {sid!r} is not in the samples")
            continue
        if sid in seen:
            problems.append(f"row {line}: sample {sid} is already labelled in row {seen[sid]}")
            continue
        seen[sid] = line
        for column in ("prompt", "completion"):
            if column in row and _same_text(row[column]) != _same_text(sample[column]):
                problems.append(f"row {line}: the {column} differs from sample {sid} (edited, or another run's sheet?)")
        if not label:
            if not allow_unlabelled:
                problems.append(f"row {line}: no label (use one of {', '.join(allowed)})")
            continue
        if label not in allowed:
            problems.append(f"row {line}: unknown label {row['label'].strip()!r} (labels: {', '.join(allowed)})")
            continue
        kept[sid] = label
        source[sid] = (row.get("labelled_by") or "").strip() or "human"
    if problems:
        # one line (the CLI prints one line), so every reported row reaches the user
        more = f"; ... and {len(problems) - MAX_REPORTED} more" if len(problems) > MAX_REPORTED else ""
        raise FakegptError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems[:MAX_REPORTED]) + more)
    if not kept:
        raise FakegptError(f"{path}: no labelled rows")
    labelled = pl.DataFrame(
        {"sample_id": list(kept), "label": list(kept.values()), "labelled_by": [source[k] for k in kept]}
    )
    return samples.join(labelled, on="sample_id", how="inner", maintain_order="left")


def aggregate(labeled: pl.DataFrame, labels: list[str] = DEFAULT_LABELS, by: list[str] = DEFAULT_BY) -> pl.DataFrame:
    """Label rates per group: columns `by` + label, count, n, prompts, design_effect, rate, ci_low, ci_high.

    The samples of one prompt are not independent (the same prompt pulls its samples the same way), so the
    95% interval is Wilson's on the effective sample size n / design effect, with the prompts as clusters
    (`fakegpt.stats.clustered_wilson`); with one sample per prompt it is the plain Wilson interval.
    """
    missing = [c for c in by if c not in labeled.columns]
    if missing:
        raise FakegptError(f"--by: no column {missing[0]!r} in the labelled samples ({', '.join(labeled.columns)})")
    rows = []
    for key, group in labeled.group_by(by, maintain_order=True):
        cluster = group["prompt_id"] if "prompt_id" in group.columns else pl.Series(range(group.height))
        for label in labels:
            hits = (group["label"] == label.lower()).cast(pl.Int64)
            per_prompt = pl.DataFrame({"c": cluster, "y": hits}).group_by("c").agg(pl.col("y").sum(), pl.len())
            k = int(hits.sum())
            low, high, deff = clustered_wilson(per_prompt["y"].to_list(), per_prompt["len"].to_list())
            rows.append(
                {
                    **dict(zip(by, key, strict=True)),
                    "label": label,
                    "count": k,
                    "n": group.height,
                    "prompts": per_prompt.height,
                    "design_effect": deff,
                    "rate": k / group.height,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return pl.DataFrame(rows).sort(by + ["label"], maintain_order=True)


def paired_rates(
    labeled: pl.DataFrame, labels: list[str], column: str, reference: object, by: Sequence[str] = ()
) -> pl.DataFrame:
    """Each label's rate for every value of `column` minus the rate for `reference`, paired by prompt.

    A prompt pulls every model's samples the same way, so the comparison is made within each prompt: per
    prompt the difference of the two rates, then their mean over the prompts both sides have samples for, with
    the prompts as clusters (`fakegpt.stats.cluster_estimate`: a t interval under 10 prompts). Each prompt
    counts once, whatever its number of samples. `by` splits the comparison further (e.g. temperature).
    Columns: by + column + label, prompts, difference, ci_low, ci_high, p_value, method.
    """
    for name in (column, "prompt_id", *by):
        if name not in labeled.columns:
            raise FakegptError(
                f"--reference: no column {name!r} in the labelled samples ({', '.join(labeled.columns)})"
            )
    values = labeled[column].unique(maintain_order=True).to_list()
    if reference not in values:
        raise FakegptError(
            f"--reference {column}={reference}: no labelled sample has that value "
            f"(values: {', '.join(map(str, values))})"
        )
    keys = [*by, column, "prompt_id"]
    per_prompt = labeled.group_by(keys, maintain_order=True).agg(
        *[(pl.col("label") == lab.lower()).mean().alias(lab) for lab in labels]
    )
    ref = per_prompt.filter(pl.col(column) == reference).drop(column)
    rows = []
    for other in (v for v in values if v != reference):
        joined = per_prompt.filter(pl.col(column) == other).join(ref, on=[*by, "prompt_id"], suffix="_ref")
        for key, group in joined.group_by(by, maintain_order=True) if by else [((), joined)]:
            for lab in labels:
                diff = (group[lab] - group[f"{lab}_ref"]).to_list()
                est = cluster_estimate(diff, [str(p) for p in group["prompt_id"]]) if len(diff) >= 2 else None
                rows.append(
                    {
                        **dict(zip(by, key, strict=True)),
                        column: other,
                        "label": lab,
                        "prompts": len(diff),
                        "difference": est.mean if est else None,
                        "ci_low": est.ci_low if est else None,
                        "ci_high": est.ci_high if est else None,
                        "p_value": est.p_value if est else None,
                        "method": est.method if est else "fewer than 2 prompts labelled on both sides",
                    }
                )
    return pl.DataFrame(rows)


def plot_rates(rates: pl.DataFrame, by: list[str], path: Path) -> Path:
    """Grouped bars: one group per `by` combination, one bar per label, Wilson intervals as error bars."""
    groups = rates.select(by).unique(maintain_order=True)
    names = [" · ".join(str(v) for v in row) for row in groups.iter_rows()]
    labels = rates["label"].unique(maintain_order=True).to_list()
    width = 0.8 / max(1, len(labels))
    size = (max(6.0, 0.6 * len(names) * max(1, len(labels)) / 2), 4.5)
    with figure(path, figsize=size, dpi=110) as (_, ax):
        for j, label in enumerate(labels):
            part = groups.join(rates.filter(pl.col("label") == label), on=by, how="left", maintain_order="left")
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(names))]
            rate = part["rate"].to_list()
            err = [
                [r - lo for r, lo in zip(rate, part["ci_low"], strict=True)],
                [hi - r for r, hi in zip(rate, part["ci_high"], strict=True)],
            ]
            ax.bar(xs, rate, width=width, yerr=err, capsize=2, label=label)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("share of labelled samples (Wilson 95% CI)")
        ax.legend()
    return path


def rates_from_sheet(
    samples: str | Path,
    sheet: str | Path,
    labels: list[str] = DEFAULT_LABELS,
    by: list[str] = DEFAULT_BY,
    allow_unlabelled: bool = False,
) -> pl.DataFrame:
    """Label rates with Wilson intervals from a sample table and its filled sheet, without any MLflow logging."""
    return aggregate(read_sheet(sheet, load_samples(samples), labels, allow_unlabelled), labels, by)


def reference_value(labeled: pl.DataFrame, spec: str) -> tuple[str, object]:
    """--reference COLUMN=VALUE as the column and the value of its own type (`fraction=0` names 0.0)."""
    column, sep, text = spec.partition("=")
    if not sep or not column:
        raise FakegptError(f"--reference {spec}: expected COLUMN=VALUE, e.g. model=gpt2")
    if column not in labeled.columns:
        raise FakegptError(f"--reference: no column {column!r} in the labelled samples ({', '.join(labeled.columns)})")
    for value in labeled[column].unique(maintain_order=True).to_list():
        if text in (str(value), f"{value:g}" if isinstance(value, float) else str(value)):
            return column, value
    raise FakegptError(f"--reference {spec}: no labelled sample has {column} = {text}")


def label_rates(cfg: AggregateConfig) -> pl.DataFrame:
    """Import + aggregate + log to MLflow (stage `labels`): the rates table, also written to out_dir, and with
    --reference the paired differences from the reference, prompt by prompt."""
    labeled = read_sheet(cfg.sheet, load_samples(cfg.samples), cfg.labels, cfg.allow_unlabelled)
    rates = aggregate(labeled, cfg.labels, cfg.by)
    paired = None
    if cfg.reference:
        column, value = reference_value(labeled, cfg.reference)
        paired = paired_rates(labeled, cfg.labels, column, value)
    out_dir = Path(cfg.out_dir)
    sources = ",".join(sorted(set(labeled["labelled_by"])))  # the rates say whose labels they count
    rates = rates.with_columns(labelled_by=pl.lit(sources))
    with tracking.run(stage="labels", run_name=None, tags={tracking.TAG_LABEL_SOURCE: sources}):
        tracking.log_params(config.to_dict(cfg))
        paths = write_table(labeled, out_dir, "labeled") + write_table(rates, out_dir, "label_rates")
        if paired is not None:
            paths += write_table(paired, out_dir, "label_rates_paired")
            tracking.set_tags({tracking.TAG_REFERENCE: cfg.reference})
            for row in paired.iter_rows(named=True):  # the differences lead: undefined ones are left out
                name = f"{tracking.PAIRED_PREFIX}{tracking.M_LABEL_RATE}/{row['label']}/{row[column]}"
                tracking.log_metrics(
                    {name: row["difference"], f"{name}_ci_low": row["ci_low"], f"{name}_ci_high": row["ci_high"]}
                )
        paths.append(plot_rates(rates, cfg.by, out_dir / "label_rates.png"))
        tracking.log_table(rates.to_dict(as_series=False), "label_rates_table.json")
        overall = labeled["label"].value_counts()
        tracking.log_metrics(
            {
                f"{tracking.M_LABEL_RATE}/{lab}": c / labeled.height
                for lab, c in zip(overall["label"], overall["count"], strict=True)
            }
        )
        for path in paths:
            tracking.log_artifact(path)
    return rates


SUBCOMMANDS = {"export": ExportConfig, "import": ImportConfig, "aggregate": AggregateConfig, "auto": AutoConfig}


def main(argv: list[str]) -> int:
    """`fakegpt labels {export|import|aggregate|auto} [flags]`; returns the exit status."""
    if argv and argv[0] in ("-h", "--help"):
        print(
            f"usage: fakegpt labels {{{'|'.join(SUBCOMMANDS)}}} [flags]\n\n"
            + (__doc__ or "")
            + "\n`fakegpt labels SUBCOMMAND --help` lists its flags."
        )
        return 0
    if not argv or argv[0] not in SUBCOMMANDS:
        raise FakegptError(f"expected a subcommand: {' | '.join(SUBCOMMANDS)} (see `fakegpt labels export --help`)")
    command, rest = argv[0], argv[1:]
    cfg: Any = config.parse(  # one of four config classes: the isinstance checks below tell which
        SUBCOMMANDS[command], rest, prog=f"fakegpt labels {command}", description=__doc__.splitlines()[0]
    )
    if isinstance(cfg, AutoConfig):
        samples = load_samples(cfg.samples)
        path, report = auto(cfg, samples, lambda p: read_sheet(p, samples, DEFAULT_LABELS, allow_unlabelled=True))
        print(f"{samples.height} samples judged -> {path}")
        if report:
            # format_kappa: a NaN kappa or bound (one class only, too few defined resamples) prints "undefined"
            print(
                f"agreement with {cfg.human}: Cohen's kappa {format_kappa(report['overall'])} "
                f"over {report['n']} samples"
            )
        return 0
    if isinstance(cfg, ExportConfig):
        check_sheet_free(cfg.sheet, cfg.force)  # before reading the samples
        samples = load_samples(cfg.samples)
        path = export_sheet(samples, cfg.sheet, cfg.blind, cfg.shuffle, cfg.seed, cfg.force)
        print(f"{samples.height} rows -> {path} (fill the `label` column with: {', '.join(DEFAULT_LABELS)})")
    elif isinstance(cfg, AggregateConfig):
        rates = label_rates(cfg)
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True):
            print(rates)
        print(f"-> {cfg.out_dir}/label_rates.csv, label_rates.png")
    else:
        labeled = read_sheet(cfg.sheet, load_samples(cfg.samples), cfg.labels, cfg.allow_unlabelled)
        paths = write_table(labeled, Path(cfg.out_dir), "labeled")
        print(f"{labeled.height} labelled samples -> {paths[0]}")
    return 0
