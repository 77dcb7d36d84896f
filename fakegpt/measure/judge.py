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
prompts, since the samples of one prompt are not independent. No NLI model ships with fakegpt: download a
multilingual one (an XNLI fine-tune) once where there is network, and pass its folder.
"""

from __future__ import annotations

import logging
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


def cohen_kappa(a: list[str], b: list[str], classes: list[str] | None = None) -> float:
    """Cohen's kappa between two labellings of the same items: (observed - chance agreement) / (1 - chance)."""
    if len(a) != len(b) or not a:
        raise ValueError("two labellings of the same, non-empty set of items are needed")
    classes = classes or sorted(set(a) | set(b))
    x, y = np.asarray(a), np.asarray(b)
    observed = float((x == y).mean())
    chance = float(sum((x == c).mean() * (y == c).mean() for c in classes))
    return 1.0 if chance == 1.0 else (observed - chance) / (1.0 - chance)


def agreement(judged: pl.DataFrame, human: pl.DataFrame, labels: list[str], n_boot: int, seed: int = 0) -> dict:
    """Kappa overall and per class (one against the rest) with 95% intervals resampling prompts."""
    both = judged.select("sample_id", "prompt_id", pl.col("label").alias("judge")).join(
        human.select("sample_id", pl.col("label").alias("human")), on="sample_id", how="inner"
    )
    if both.height == 0:
        raise FakegptError("--human: none of its samples were judged (a sheet of other samples?)")
    groups = [idx.to_numpy() for idx in both.with_row_index("i").group_by("prompt_id").agg("i")["i"]]
    rng = np.random.default_rng(seed)
    judge, human_labels = both["judge"].to_numpy(), both["human"].to_numpy()

    def kappas(rows: np.ndarray) -> dict[str, float]:
        j, h = judge[rows].tolist(), human_labels[rows].tolist()
        out = {"overall": cohen_kappa(j, h, labels)}
        for c in labels:
            out[c] = cohen_kappa([v == c for v in j], [v == c for v in h], [True, False])
        return out

    point = kappas(np.arange(both.height))
    draws = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(groups), size=len(groups))
        draws.append(kappas(np.concatenate([groups[g] for g in picked])))
    result = {"n": both.height, "prompts": len(groups), "intervals": "95% bootstrap over prompts"}
    for key, value in point.items():
        values = np.array([d[key] for d in draws])
        low, high = np.quantile(values, [0.025, 0.975])
        result[key] = {"kappa": value, "ci_low": float(low), "ci_high": float(high)}
    return result


def auto(cfg: AutoConfig, samples: pl.DataFrame, read_human: Any) -> tuple[Path, dict | None]:
    """Judge every sample, write the sheet (and agreement.json beside it with --human); returns both."""
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
            report = agreement(judged, human, labels, cfg.bootstrap)
            write_json(path.with_name("agreement.json"), report)
            tracking.log_artifact(path.with_name("agreement.json"))
            tracking.log_metrics(
                {f"{tracking.M_JUDGE_KAPPA}/{k}": v["kappa"] for k, v in report.items() if isinstance(v, dict)}
            )
    return path, report
