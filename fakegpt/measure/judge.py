"""`fakegpt labels auto`: stance labels for thousands of samples from a zero-shot NLI model, and its validity.

    fakegpt labels auto --samples out/sample --judge models/nli-pt --sheet out/labels/auto.csv
    fakegpt labels auto --samples out/sample --judge models/nli-pt --sheet auto.csv --human sheet.csv

Each sample's completion is the premise; the topic's false claim and its correction (the claims file, in the
sample's language) are the two hypotheses. The judge's entailment probability for each gives the label:
`adopts` when the claim is entailed more than the correction, `refutes` when the correction is, `off-topic`
when neither reaches `--threshold`. The sheet has the human sheets' format (so `labels import` and `labels
aggregate` read it unchanged) plus the judge's probabilities and a `labelled_by` column naming the judge.

A judge is trusted only after it is measured: with `--human SHEET` (a filled human sheet of the same samples)
it reports Cohen's kappa overall and per class (one class against the rest), with 95% intervals that resample
prompts, since the samples of one prompt are not independent, and the judge x human confusion counts. Kappa
is undefined (NaN; null in agreement.json) where both labellings use a single class; resamples where it is
undefined are left out of the interval and counted (`undefined_resamples`), and too many of them leave no
interval (see `kappa_entry`). The same report is given per dose (`per_fraction`, for a mixture series'
all_samples.parquet) and per model (`per_model`). No NLI model ships with fakegpt: download a multilingual
one (an XNLI fine-tune) once where there is network, and pass its folder.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fakegpt import config, tracking
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_json
from fakegpt.measure.prompts import DEFAULT_CLAIMS, load_claims, resolve_path
from fakegpt.models.device import resolve_device

log = logging.getLogger(__name__)

ADOPTS, REFUTES, OFF_TOPIC = "adopts", "refutes", "off-topic"
JUDGE_COLUMNS = ("judge_adopts", "judge_refutes", "judge_off_topic")


@dataclass
class AutoConfig:
    """`fakegpt labels auto`: label samples with a zero-shot NLI judge; measure it against human labels."""

    samples: str = field(default="out/sample", metadata={"help": "a sample run's out_dir or its samples table"})
    judge: str = field(default="", metadata={"help": "local folder of an NLI sequence-classification model"})
    sheet: str = field(default="out/labels/auto.csv", metadata={"help": "the labelled sheet (CSV) to write"})
    claims: str = field(default=DEFAULT_CLAIMS, metadata={"help": "claims YAML: each topic's claim and correction"})
    threshold: float = field(default=0.5, metadata={"help": "entailment probability below which: off-topic"})
    human: str = field(default="", metadata={"help": "a filled human sheet of the same samples: report agreement"})
    batch_size: int = field(default=16, metadata={"help": "premise/hypothesis pairs per forward pass"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples (over prompts) for kappa intervals"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    force: bool = field(default=False, metadata={"help": "replace an existing sheet"})


def hypotheses(claims: str | Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(topic, language) -> (false claim, correction): the first pair of each topic and language."""
    out: dict[tuple[str, str], dict[str, str]] = {}
    for s in load_claims(claims):
        if s.pair_id and s.variant == 0 and s.pair_id.endswith("/0"):
            out.setdefault((s.topic, s.language), {})[s.role] = s.text
    return {k: (v["false"], v["true"]) for k, v in out.items() if {"false", "true"} <= set(v)}


def load_judge(folder: str | Path, device: Any) -> tuple[Any, Any, int]:
    """(model, tokenizer, index of the entailment class) from a local sequence-classification folder."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise FakegptError(f"--judge {folder}: not a local model folder (no config.json); download an NLI model")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise FakegptError(f"--judge {folder}: cannot load ({str(exc).splitlines()[0]})") from None
    names = {i: str(n).lower() for i, n in model.config.id2label.items()}
    entail = [i for i, n in names.items() if n.startswith("entail")]
    if len(entail) != 1:
        raise FakegptError(
            f"--judge {folder}: no 'entailment' class in its labels ({', '.join(names.values())}); "
            "an NLI model is needed"
        )
    if tokenizer.pad_token is None:  # GPT-style tokenizers: pad with end-of-text, the model is told below
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, entail[0]


def entailment(model: Any, tokenizer: Any, entail: int, premises: list[str], hyps: list[str], batch: int) -> np.ndarray:
    """P(entailment) of each (premise, hypothesis) pair, softmax over the judge's classes."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(premises), batch):
            enc = tokenizer(
                premises[i : i + batch], hyps[i : i + batch], return_tensors="pt", padding=True, truncation=True
            ).to(device)
            logits = model(**enc).logits.float()  # (B, classes)
            out.append(torch.softmax(logits, dim=-1)[:, entail].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def judge_samples(samples: pl.DataFrame, cfg: AutoConfig) -> pl.DataFrame:
    """The samples with the judge's probabilities and label (one row per sample)."""
    hyp = hypotheses(resolve_path(cfg.claims))
    keys = list(zip(samples["topic"], samples["language"], strict=True))
    missing = sorted({f"{t}/{lang}" for t, lang in keys if (t, lang) not in hyp})
    if missing:
        raise FakegptError(f"--claims {cfg.claims}: no claim pair for topic/language {missing[0]} of the samples")
    model, tokenizer, entail = load_judge(cfg.judge, resolve_device(cfg.device))
    premises = samples["completion"].fill_null("").to_list()
    p_claim = entailment(model, tokenizer, entail, premises, [hyp[k][0] for k in keys], cfg.batch_size)
    p_correction = entailment(model, tokenizer, entail, premises, [hyp[k][1] for k in keys], cfg.batch_size)
    best = np.maximum(p_claim, p_correction)
    labels = np.where(best < cfg.threshold, OFF_TOPIC, np.where(p_claim >= p_correction, ADOPTS, REFUTES))
    return samples.with_columns(
        label=pl.Series(labels.tolist()),
        judge_adopts=pl.Series(p_claim),
        judge_refutes=pl.Series(p_correction),
        judge_off_topic=pl.Series(1.0 - best),
        labelled_by=pl.lit(f"judge:{Path(cfg.judge).name}"),
    )


MIN_DEFINED_SHARE = 0.8  # an interval needs at least this share of resamples with kappa defined (see kappa_entry)
GROUP_COLUMNS = ("fraction", "model")  # the samples' columns agreement is also reported per value of, when present


def kappa_from_confusion(counts: np.ndarray) -> np.ndarray:
    """Cohen's kappa of one or more confusion matrices `counts[..., judge, human]`; NaN where it is undefined.

    With n items, A agreements and C = sum over classes of (judge count x human count), kappa is
    (n A - C) / (n^2 - C): the usual (observed - chance) / (1 - chance) multiplied through by n^2, so that the
    one undefined case, chance agreement exactly 1 (both labellings use one and the same class only), is an
    exact integer test rather than a float comparison.
    """
    m = np.asarray(counts, dtype=np.int64)
    n = m.sum(axis=(-2, -1))
    agree = np.trace(m, axis1=-2, axis2=-1)
    chance = (m.sum(axis=-1) * m.sum(axis=-2)).sum(axis=-1)
    denominator = n * n - chance
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator == 0, np.nan, (n * agree - chance) / denominator)


def confusion_matrix(a: list, b: list, classes: list) -> np.ndarray:
    """Counts [i, j] of items labelled classes[i] in `a` and classes[j] in `b`."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(v) for v in (*a, *b) if v not in index})
    if unknown:
        raise ValueError(f"label {unknown[0]!r} is not one of the classes {classes}")
    k = len(classes)
    codes = np.array([index[x] * k + index[y] for x, y in zip(a, b, strict=True)], dtype=np.int64)
    return np.bincount(codes, minlength=k * k).reshape(k, k)


def cohen_kappa(a: list, b: list, classes: list | None = None) -> float:
    """Cohen's kappa between two labellings of the same items: (observed - chance agreement) / (1 - chance).

    NaN (math.nan) when chance agreement is 1, i.e. both labellings put every item in the same single class:
    kappa is 0/0 there, and calling it perfect agreement (the old 1.0) made bootstrap resamples that happened
    to miss a rare class count as perfect, pushing the upper bound of the interval to 1.0.
    """
    if len(a) != len(b) or not a:
        raise ValueError("two labellings of the same, non-empty set of items are needed")
    classes = classes or sorted(set(a) | set(b))
    return float(kappa_from_confusion(confusion_matrix(a, b, classes)))


def one_vs_rest(counts: np.ndarray, i: int) -> np.ndarray:
    """The 2x2 matrices [..., (class i, the rest), (class i, the rest)] collapsed from K x K confusion matrices."""
    hit = counts[..., i, i]
    judge_only = counts[..., i, :].sum(axis=-1) - hit
    human_only = counts[..., :, i].sum(axis=-1) - hit
    rest = counts.sum(axis=(-2, -1)) - hit - judge_only - human_only
    return np.stack([np.stack([hit, judge_only], -1), np.stack([human_only, rest], -1)], -2)


def kappa_entry(point: np.ndarray, draws: np.ndarray, names: list[str], prompts: int) -> dict[str, Any]:
    """kappa, its interval over the bootstrap draws that define it, how many did not, and the confusion matrix.

    A draw whose kappa is undefined (both labellings put all its items in one class: for a class against the
    rest, mostly a draw in which nobody used the class) says nothing about agreement, so it is left out of the
    quantiles and counted in `undefined_resamples`. The interval is then one of the resamples that hold the
    class, which stands for the data only when nearly all do. When the class occurs
    in the samples of a single prompt (of P), a resample misses that prompt with probability (1 - 1/P)^P,
    25% to 37% for P >= 2, and every resample that has the class has it from that one prompt: there is no
    spread between prompts to measure. With the class in two prompts or more, misses fall to at most 14%
    ((1 - 2/P)^P <= e^-2). MIN_DEFINED_SHARE = 80% separates the two cases: with fewer defined resamples,
    or fewer than 2 prompts (every resample is then the same one), ci_low and ci_high are NaN.
    """
    kappa = float(kappa_from_confusion(point))
    boot = kappa_from_confusion(draws)
    defined = boot[~np.isnan(boot)]
    undefined = int(boot.size - defined.size)
    note = None
    if prompts < 2:
        low = high = math.nan
        note = "interval undefined: fewer than 2 prompts to resample"
    elif defined.size == 0 or defined.size < MIN_DEFINED_SHARE * boot.size:
        low = high = math.nan
        note = (
            f"interval undefined: kappa is defined in {defined.size} of {boot.size} resamples "
            f"(under {MIN_DEFINED_SHARE:.0%})"
        )
    else:
        low, high = (float(q) for q in np.quantile(defined, [0.025, 0.975]))
    if math.isnan(kappa):
        note = "kappa undefined: both labellings use one class only" + (f"; {note}" if note else "")
    table = {j: {h: int(point[a, b]) for b, h in enumerate(names)} for a, j in enumerate(names)}
    return {
        "kappa": kappa,
        "ci_low": low,
        "ci_high": high,
        "undefined_resamples": undefined,
        "confusion": table,
        "note": note,
    }


def paired_labels(judged: pl.DataFrame, human: pl.DataFrame, by: list[str]) -> pl.DataFrame:
    """sample_id, prompt_id, the `by` columns, judge and human label: one row per sample both labelled."""
    both = judged.select("sample_id", "prompt_id", *by, pl.col("label").alias("judge")).join(
        human.select("sample_id", pl.col("label").alias("human")), on="sample_id", how="inner"
    )
    if both.height == 0:
        raise FakegptError("--human: none of its samples were judged (a sheet of other samples?)")
    return both


def agreement_report(both: pl.DataFrame, labels: list[str], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Kappa overall and per class (one against the rest) of paired labels, with intervals resampling prompts."""
    unknown = sorted((set(both["judge"]) | set(both["human"])) - set(labels))
    if unknown:
        raise FakegptError(f"agreement: label {unknown[0]!r} is not one of {labels}")
    # Prompts in sorted order, not group_by's arbitrary one, so a seed gives the same draws on every run.
    prompts = sorted(set(both["prompt_id"].to_list()))
    index = {c: i for i, c in enumerate(labels)}
    where = {p: i for i, p in enumerate(prompts)}
    k = len(labels)
    per_prompt = np.zeros((len(prompts), k, k), dtype=np.int64)
    np.add.at(
        per_prompt,
        (
            np.array([where[p] for p in both["prompt_id"]], dtype=np.int64),
            np.array([index[v] for v in both["judge"]], dtype=np.int64),
            np.array([index[v] for v in both["human"]], dtype=np.int64),
        ),
        1,
    )
    rng = np.random.default_rng(seed)
    # A draw takes len(prompts) prompts with replacement (one rng.integers call per draw, in order); its
    # confusion matrix is the sum of theirs, a prompt drawn twice counted twice.
    times = np.zeros((n_boot, len(prompts)), dtype=np.int64)
    for row in times:
        row += np.bincount(rng.integers(0, len(prompts), size=len(prompts)), minlength=len(prompts))
    draws = np.tensordot(times, per_prompt, axes=1)  # (n_boot, k, k)
    point = per_prompt.sum(axis=0)
    report: dict[str, Any] = {
        "n": both.height,
        "prompts": len(prompts),
        "intervals": (
            f"95% bootstrap over prompts ({n_boot} resamples); resamples with kappa undefined are left out "
            f"and counted; no interval under {MIN_DEFINED_SHARE:.0%} defined"
        ),
        "overall": kappa_entry(point, draws, labels, len(prompts)),
    }
    for i, c in enumerate(labels):
        names = [c, f"not {c}"]
        report[c] = kappa_entry(one_vs_rest(point, i), one_vs_rest(draws, i), names, len(prompts))
    return report


def agreement(
    judged: pl.DataFrame,
    human: pl.DataFrame,
    labels: list[str],
    n_boot: int,
    seed: int = 0,
    by: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """Kappa overall and per class with 95% intervals resampling prompts; with `by`, also per value of each.

    `per_<column>` maps each (non-null) value of the column among the paired samples, as a string (0.2 ->
    "0.2"), to the report of those samples alone: exactly `agreement` of the judged rows with that value (same
    labels, same seed), so a dose's numbers do not depend on which other doses were labelled.
    """
    missing = [c for c in by if c not in judged.columns]
    if missing:
        raise FakegptError(f"agreement by {missing[0]!r}: the judged samples have no such column")
    both = paired_labels(judged, human, list(by))
    report = agreement_report(both, labels, n_boot, seed)
    for column in by:
        values = sorted(both[column].drop_nulls().unique().to_list())
        report[f"per_{column}"] = {
            str(v): agreement_report(both.filter(pl.col(column) == v), labels, n_boot, seed) for v in values
        }
    return report


def metric_part(value: str) -> str:
    """A group value as one MLflow metric-name segment: characters MLflow refuses (and '/') become '_'.

    MLflow names allow letters, digits, _ - . space and /; '/' would split a model spec such as runs:/<id>/best
    into levels of the name. Two values differing only in such characters would share a name.
    """
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", value)


def agreement_metrics(report: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of a report: labels/judge_kappa/<key>, labels/judge_kappa_by_<column>/<value>/<key>.

    Undefined (NaN) kappas are left out: MLflow would store NaN as a number, and a missing point reads right.
    """

    def kappas(part: dict[str, Any], prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/{key}": entry["kappa"]
            for key, entry in part.items()
            if isinstance(entry, dict) and "kappa" in entry and not math.isnan(entry["kappa"])
        }

    out = kappas(report, tracking.M_JUDGE_KAPPA)
    for section, groups in report.items():
        if section.startswith("per_"):
            for value, part in groups.items():
                out |= kappas(part, f"{tracking.M_JUDGE_KAPPA}_by_{section[4:]}/{metric_part(value)}")
    return out


def strict_json(data: Any) -> Any:
    """`data` with NaN floats as None, so agreement.json is JSON every reader accepts (NaN is not JSON)."""
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [strict_json(v) for v in data]
    return None if isinstance(data, float) and math.isnan(data) else data


def format_kappa(entry: dict[str, Any]) -> str:
    """'0.812 [0.650, 0.910]' for a kappa entry, with 'undefined' for a NaN (or null) kappa or bound."""

    def number(x: float | None) -> str:
        return "undefined" if x is None or math.isnan(x) else f"{x:.3f}"

    if entry["ci_low"] is None or math.isnan(entry["ci_low"]):
        interval = "[interval undefined]"
    else:
        interval = f"[{number(entry['ci_low'])}, {number(entry['ci_high'])}]"
    return f"{number(entry['kappa'])} {interval}"


def auto(cfg: AutoConfig, samples: pl.DataFrame, read_human: Any) -> tuple[Path, dict | None]:
    """Judge every sample, write the sheet (and agreement.json beside it with --human); returns both.

    agreement.json has the pooled report plus `per_fraction` / `per_model` for those of the two columns the
    samples have (a mixture series' all_samples.parquet has `fraction`), even with one value, so its shape
    depends only on the table's columns.
    """
    if not cfg.judge:
        raise FakegptError("--judge: the folder of an NLI model is required")
    if not 0.0 < cfg.threshold < 1.0:
        raise FakegptError(f"--threshold: must be between 0 and 1, got {cfg.threshold}")
    path = Path(cfg.sheet)
    if path.exists() and not cfg.force:
        raise FakegptError(f"{path}: exists; pass --force to replace it (a sheet may hold hours of labels)")
    human = read_human(cfg.human) if cfg.human else None
    judged = judge_samples(samples, cfg)
    with tracking.run(stage="labels", run_name=None, tags={tracking.TAG_LABEL_SOURCE: f"judge:{Path(cfg.judge).name}"}):
        tracking.log_params(config.to_dict(cfg))
        columns = [c for c in ("sample_id", "topic", "framing", "language", "prompt", "completion") if c in judged]
        sheet = judged.select(*columns, "label", *JUDGE_COLUMNS, "labelled_by")
        with atomic_path(path, suffix=".csv") as tmp:
            sheet.write_csv(tmp)
        tracking.log_artifact(path)
        report = None
        if human is not None:
            labels = sorted(set(judged["label"]) | set(human["label"]))
            by = [c for c in GROUP_COLUMNS if c in judged.columns]
            report = agreement(judged, human, labels, cfg.bootstrap, by=by)
            write_json(path.with_name("agreement.json"), strict_json(report))
            tracking.log_artifact(path.with_name("agreement.json"))
            tracking.log_metrics(agreement_metrics(report))
    return path, report
