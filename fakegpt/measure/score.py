"""`fakegpt score`: claim-likelihood scores, an automatic measure of how much a model believes a narrative.

    fakegpt score --models gpt2,runs:/<finetune run id> --claims experiments/claims/antivax_six.yaml

For every statement, the length-normalised log-likelihood: the mean over its tokens of log p(token | <eot> +
the tokens before it). For every pair, score = loglik(false claim) - loglik(correction): above 0 means the model
finds the false claim more likely. Per topic and overall: the mean score with a bootstrap 95% interval over
claims (a pair and its translation resampled together), and the share of pairs the false claim wins. With
--data-dir, also the perplexity on fixed windows of val.bin. One model: metrics on the stage's run; several:
one nested child run per model (tagged with its dose fraction from training_info.json) plus a plot of the
score against that fraction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fakegpt import config, tracking
from fakegpt.data import bins
from fakegpt.data.bins import check_vocab, eval_starts, open_bin
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_json, write_table
from fakegpt.measure.generate import token_logprobs
from fakegpt.measure.prompts import DEFAULT_CLAIMS, Statement, load_claims, resolve_path
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.loading import model_config
from fakegpt.models.refs import ModelRef, context_length, load_for_inference, resolve_model
from fakegpt.plots import figure
from fakegpt.stats import cluster_bootstrap_ci

log = logging.getLogger(__name__)

VAL_BLOCK = 256  # tokens per validation window: fixed, so perplexities of different models are comparable


# What the intervals resample, written into summary.json so that a reader of the numbers knows.
INTERVALS = (
    "95% percentile bootstrap over claims: a claim's pairs in every language (a Portuguese pair and its English "
    "translation) are resampled together, since a translation is not independent evidence"
)


@dataclass
class ScoreConfig:
    """`fakegpt score` settings: models, claim set, bootstrap, optional validation perplexity."""

    models: list[str] = field(
        default_factory=lambda: ["gpt2"],
        metadata={
            "help": "models, comma-separated: hub names, local HF folders, runs:/<run_id>[/checkpoint], models:/..."
        },
    )
    claims: str = field(
        default=DEFAULT_CLAIMS,
        metadata={"help": "claim set YAML (experiments/claims/) or a text file with one statement per line"},
    )
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "float32 (default: score differences are small numbers) | auto (bfloat16 on CUDA) | bfloat16"
        },
    )
    batch_size: int = field(default=16, metadata={"help": "statements per forward pass"})
    out_dir: str = field(default="out/score", metadata={"help": "where scores.parquet/csv and summary.json go"})
    data_dir: str = field(
        default="",
        metadata={"help": "prepared data folder (or runs:/<prepare run>/data) for validation perplexity; empty = skip"},
    )
    val_windows: int = field(default=32, metadata={"help": f"validation windows of {VAL_BLOCK} tokens"})
    general_data: str = field(
        default="",
        metadata={
            "help": "a prepared general-language folder (or runs:/<prepare run>/data), the same for every model "
            "compared: perplexity on its val.bin measures general ability beside the claim scores; empty = skip"
        },
    )
    dose_source: str = field(
        default="antivax",
        metadata={"help": "mixture source whose fraction (training_info.json) is the x axis of the score plot"},
    )
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples for the 95% intervals"})
    seed: int = field(default=0, metadata={"help": "bootstrap seed"})


@dataclass
class GroupScore:
    """The claim score of a group of pairs: mean log p(false) - log p(true), its interval and win rate."""

    n_pairs: int
    mean: float
    ci_low: float
    ci_high: float
    win_rate: float


@dataclass
class Interval:
    """A mean over claim items with its 95% claim-cluster bootstrap interval."""

    n: int
    mean: float
    ci_low: float
    ci_high: float


@dataclass
class ModelScore:
    """One model's scores: overall, per topic and per language, plus mean log-likelihood and perplexity."""

    model: str
    fraction: float | None
    n_statements: int
    mean_loglik: float
    overall: GroupScore | None  # None when the claims file has no pairs (a plain text file)
    per_topic: dict[str, GroupScore] = field(default_factory=dict)
    per_language: dict[str, GroupScore] = field(default_factory=dict)
    val_perplexity: float | None = None
    general_perplexity: float | None = None
    run_id: str | None = None
    mc1: Interval | None = None  # over claim items, intervals resampling claims
    mc2: Interval | None = None


@dataclass
class ScoreResult:
    """Every model's scores and the per-statement and per-pair tables behind them."""

    models: list[ModelScore]
    statements: pl.DataFrame  # one row per model x statement
    pairs: pl.DataFrame  # one row per model x pair
    out_dir: Path
    plot: Path | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON-able summary written as summary.json."""
        return {"models": [asdict(m) for m in self.models], "intervals": INTERVALS}


def statement_logliks(model: Any, statements: list[Statement], batch_size: int) -> list[tuple[float, int]]:
    """(length-normalised log-likelihood, token count) per statement, each scored after an <eot> context."""
    enc = get_encoding()
    sequences = [[EOT_TOKEN] + enc.encode(s.text) for s in statements]
    logps = token_logprobs(model, sequences, batch_size=batch_size)
    return [(float(lp.mean()), int(lp.numel())) for lp in logps]


def val_perplexity(model: Any, data_dir: str | Path, n_windows: int, batch_size: int) -> float:
    """exp(mean next-token loss) over fixed windows of val.bin (the same windows for every model)."""
    block = min(VAL_BLOCK, context_length(model) - 1)
    data = open_bin(data_dir, "val", block)
    check_vocab(data, int(model.config.vocab_size), Path(data_dir) / "val.bin")
    starts = eval_starts(len(data), block, n_windows)
    windows = [np.asarray(data[s : s + block + 1]).astype(np.int64).tolist() for s in starts]
    logps = token_logprobs(model, windows, batch_size=max(1, batch_size // 4))
    return float(math.exp(-float(np.mean([lp.mean().item() for lp in logps]))))


def group_score(diffs: np.ndarray, claims: Sequence[str], n_boot: int, seed: int) -> GroupScore:
    """Mean, claim-cluster bootstrap interval and false-claim win rate of per-pair score differences `diffs`.

    `claims` names each pair's claim: a pair and its translation are resampled together (see INTERVALS).
    """
    low, high = cluster_bootstrap_ci(diffs, claims, n_boot=n_boot, seed=seed)
    return GroupScore(
        n_pairs=int(diffs.size), mean=float(diffs.mean()), ci_low=low, ci_high=high, win_rate=float((diffs > 0).mean())
    )


def pair_table(statements: pl.DataFrame) -> pl.DataFrame:
    """Join each false claim with its correction: one row per model x pair with the score."""
    keys = ["model", "pair_id", "claim_id", "topic", "language"]
    paired = statements.filter((pl.col("pair_id") != "") & (pl.col("variant") == 0))  # paraphrases: MC1/MC2
    false = paired.filter(pl.col("role") == "false").select(
        *keys,
        pl.col("text").alias("claim"),
        pl.col("loglik").alias("loglik_false"),
        pl.col("tokens").alias("tokens_false"),
    )
    true = paired.filter(pl.col("role") == "true").select(
        *keys,
        pl.col("text").alias("correction"),
        pl.col("loglik").alias("loglik_true"),
        pl.col("tokens").alias("tokens_true"),
    )
    out = false.join(true, on=keys, how="inner", maintain_order="left")
    return out.with_columns(score=pl.col("loglik_false") - pl.col("loglik_true")).with_columns(
        false_wins=pl.col("score") > 0
    )


def mc_table(statements: pl.DataFrame) -> pl.DataFrame:
    """MC1 and MC2 per model x claim item, over all its paraphrases (TruthfulQA's multiple-choice scores, with
    the false statements as the answer of interest).

    MC1 is 1 when the most likely statement of the item is a false one. MC2 is the share of probability on the
    false statements: sum over false of p / sum over all of p, with p = exp(length-normalised log-likelihood),
    the per-token (geometric mean) probability, so that long and short paraphrases compete on equal terms.
    """
    paired = statements.filter(pl.col("pair_id") != "")
    p = (pl.col("loglik") - pl.col("loglik").max().over("model", "pair_id")).exp()  # stable: max term is 1
    scored = paired.with_columns(p=p, best=pl.col("loglik") == pl.col("loglik").max().over("model", "pair_id"))
    return (
        scored.group_by("model", "pair_id", maintain_order=True)
        .agg(
            pl.col("claim_id").first(),
            pl.col("topic").first(),
            pl.col("language").first(),
            (pl.col("role") == "false").sum().alias("n_false"),
            (pl.col("role") == "true").sum().alias("n_true"),
            ((pl.col("role") == "false") & pl.col("best")).any().cast(pl.Float64).alias("mc1"),
            (pl.col("p").filter(pl.col("role") == "false").sum() / pl.col("p").sum()).alias("mc2"),
        )
        .filter((pl.col("n_false") > 0) & (pl.col("n_true") > 0))
    )


def summarise(
    spec: str, fraction: float | None, statements: pl.DataFrame, pairs: pl.DataFrame, cfg: ScoreConfig
) -> ModelScore:
    """Aggregate one model's statement and pair tables into its ModelScore."""
    result = ModelScore(
        model=spec,
        fraction=fraction,
        n_statements=statements.height,
        mean_loglik=float(statements["loglik"].mean()),
        overall=None,
    )
    if pairs.height:
        result.overall = group_score(pairs["score"].to_numpy(), pairs["claim_id"], cfg.bootstrap, cfg.seed)
        for column, target in (("topic", result.per_topic), ("language", result.per_language)):
            for value in pairs[column].unique(maintain_order=True).to_list():
                part = pairs.filter(pl.col(column) == value)
                target[value] = group_score(part["score"].to_numpy(), part["claim_id"], cfg.bootstrap, cfg.seed)
    mc = mc_table(statements)
    if mc.height:
        for name in ("mc1", "mc2"):
            low, high = cluster_bootstrap_ci(mc[name].to_numpy(), mc["claim_id"], n_boot=cfg.bootstrap, seed=cfg.seed)
            setattr(result, name, Interval(n=mc.height, mean=float(mc[name].mean()), ci_low=low, ci_high=high))
    return result


def metrics_of(score: ModelScore) -> dict[str, float]:
    """The MLflow metrics of one model (names from fakegpt.tracking, so runs line up in the compare view)."""
    out: dict[str, float] = {tracking.M_CLAIM_LOGLIK: score.mean_loglik}
    if score.overall is not None:
        out.update(
            {
                tracking.M_CLAIM_SCORE: score.overall.mean,
                tracking.M_CLAIM_SCORE_LOW: score.overall.ci_low,
                tracking.M_CLAIM_SCORE_HIGH: score.overall.ci_high,
                tracking.M_CLAIM_WIN: score.overall.win_rate,
            }
        )
        for topic, g in score.per_topic.items():
            out[tracking.claim_topic_metric(topic)] = g.mean
            out[tracking.claim_topic_metric(topic, tracking.M_CLAIM_WIN)] = g.win_rate
    for name, metric in (("mc1", tracking.M_CLAIM_MC1), ("mc2", tracking.M_CLAIM_MC2)):
        value = getattr(score, name)
        if value is not None:
            out.update({metric: value.mean, f"{metric}_ci_low": value.ci_low, f"{metric}_ci_high": value.ci_high})
    if score.val_perplexity is not None:
        out[tracking.M_VAL_PPL] = score.val_perplexity
    if score.general_perplexity is not None:
        out[tracking.M_GENERAL_PPL] = score.general_perplexity
    return out


def plot_dose(scores: list[ModelScore], path: Path, source: str) -> Path | None:
    """Score (with its 95% interval) against the dose fraction, when at least two models have one."""
    points = sorted((s.fraction, s.overall) for s in scores if s.fraction is not None and s.overall is not None)
    if len(points) < 2:
        return None
    xs = [f for f, _ in points]
    ys = [g.mean for _, g in points]
    err = [[g.mean - g.ci_low for _, g in points], [g.ci_high - g.mean for _, g in points]]
    with figure(path, figsize=(6.5, 4), dpi=110) as (_, ax):
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xlabel(f"{source} fraction of the fine-tuning mixture")
        ax.set_ylabel("claim score: log p(false) - log p(true)")
        ax.grid(alpha=0.3)
    return path


def statement_table(spec: str, statements: list[Statement]) -> pl.DataFrame:
    """One row per statement with where it sits in the claim set (pair, claim, side, paraphrase, topic)."""
    return pl.DataFrame(
        {
            "model": [spec] * len(statements),
            "statement_id": [s.statement_id for s in statements],
            "pair_id": [s.pair_id for s in statements],
            "claim_id": [s.claim_id or s.pair_id or s.statement_id for s in statements],
            "variant": [s.variant for s in statements],
            "role": [s.role for s in statements],
            "topic": [s.topic for s in statements],
            "language": [s.language for s in statements],
            "text": [s.text for s in statements],
        }
    )


def score_model(model: Any, spec: str, statements: list[Statement], cfg: ScoreConfig) -> pl.DataFrame:
    """Length-normalised log-likelihood of every statement under `model`, one row per statement."""
    scored = statement_logliks(model, statements, cfg.batch_size)
    return statement_table(spec, statements).with_columns(
        tokens=pl.Series([n for _, n in scored], dtype=pl.Int64),
        loglik=pl.Series([ll for ll, _ in scored], dtype=pl.Float64),
    )


def write_outputs(result: ScoreResult) -> list[Path]:
    """Write scores.parquet/.csv, statements.parquet and summary.json atomically; returns their paths."""
    out = result.out_dir
    paths = write_table(result.pairs, out, "scores") + [out / "statements.parquet", out / "summary.json"]
    with atomic_path(paths[2], suffix=".parquet") as tmp:
        result.statements.write_parquet(tmp)
    paths += write_table(mc_table(result.statements), out, "multiple_choice")
    write_json(paths[3], result.summary())
    return paths


def _evaluation_data(spec: str, context: str, folder: Path | None = None) -> Path | None:
    """A data folder to measure perplexity on (downloaded if an artifact URI), recorded as a dataset input."""
    if not spec:
        return None
    folder = folder if folder is not None else tracking.local_path(spec)
    name = DatasetMeta.load(folder).dataset if (folder / META_FILE).is_file() else folder.name
    tracking.log_dataset_input(name, spec, bins.fingerprint(folder), context=context)
    return folder


def validate(cfg: ScoreConfig) -> None:
    """Reject bad settings before loading anything, naming the flag."""
    if not cfg.models or any(not m.strip() for m in cfg.models):
        raise FakegptError("--models: give at least one model")
    for name in ("batch_size", "val_windows", "bootstrap"):
        if getattr(cfg, name) < 1:
            raise FakegptError(f"{config.flag_name(name)}: must be at least 1, got {getattr(cfg, name)}")


def check_inputs(
    cfg: ScoreConfig, claims_path: Path, statements: list[Statement], refs: list[ModelRef]
) -> tuple[Path | None, Path | None]:
    """Every statement fits every model's context, and the validation and general bins fit its vocabulary (from
    config.json, before any model is loaded). Returns the local data and general folders (downloaded once for
    all models), or None where not given."""
    enc = get_encoding()
    lengths = [len(enc.encode(s.text)) + 1 for s in statements]  # + the <eot> context
    longest = max(range(len(statements)), key=lengths.__getitem__)
    data_dir = tracking.local_path(cfg.data_dir) if cfg.data_dir else None
    general_dir = tracking.local_path(cfg.general_data) if cfg.general_data else None
    for ref in refs:
        hf = model_config(ref.folder)
        limit, vocab = int(hf.get("n_positions", 1024)), int(hf.get("vocab_size", 50257))
        if lengths[longest] > limit:
            raise FakegptError(
                f"{claims_path}: statement {statements[longest].statement_id!r} is {lengths[longest]} tokens, "
                f"longer than the context of model {ref.spec} ({limit} tokens)"
            )
        for folder in (data_dir, general_dir):
            if folder is not None:
                check_vocab(open_bin(folder, "val", min(VAL_BLOCK, limit - 1)), vocab, Path(folder) / "val.bin")
    return data_dir, general_dir


def score(cfg: ScoreConfig) -> ScoreResult:
    """Score every model on the claim set; write tables and summary; log metrics (child run per model if many)."""
    validate(cfg)
    claims_path = resolve_path(cfg.claims or DEFAULT_CLAIMS)
    statements = load_claims(claims_path)
    refs = [resolve_model(spec) for spec in cfg.models]  # config.json and weight headers checked here
    data_dir, general_dir = check_inputs(cfg, claims_path, statements, refs)
    device = resolve_device(cfg.device)
    dtype = torch_dtype(resolve_dtype(cfg.dtype, device))
    several = len(cfg.models) > 1
    with tracking.run(stage="score", run_name=None, tags={tracking.TAG_MODEL: ",".join(cfg.models)}):
        tracking.log_params(config.to_dict(cfg))
        tracking.log_artifact(claims_path, "claims")
        _evaluation_data(cfg.data_dir, "evaluation", data_dir)
        general_dir = _evaluation_data(cfg.general_data, "general", general_dir)
        tables, pair_tables, scores = [], [], []
        for spec, ref in zip(cfg.models, refs, strict=True):
            fraction = ref.fraction(cfg.dose_source)
            model = load_for_inference(ref, device, dtype)
            table = score_model(model, spec, statements, cfg)
            pairs = pair_table(table)
            summary = summarise(spec, fraction, table, pairs, cfg)
            if data_dir is not None:
                summary.val_perplexity = val_perplexity(model, data_dir, cfg.val_windows, cfg.batch_size)
            if general_dir is not None:
                summary.general_perplexity = val_perplexity(model, general_dir, cfg.val_windows, cfg.batch_size)
            del model
            tags = {tracking.TAG_MODEL: spec}
            if fraction is not None:
                tags[tracking.TAG_FRACTION] = fraction
            if several:
                with tracking.run(stage="score", run_name=f"score {spec}", tags=tags, nested=True) as child:
                    tracking.log_metrics(metrics_of(summary))
                    summary.run_id = child.info.run_id
            else:
                tracking.set_tags(tags)
                tracking.log_metrics(metrics_of(summary))
                summary.run_id = tracking.active_run_id()
            overall = summary.overall
            log.info(
                "%s: score %s, mean log-likelihood %.3f%s",
                spec,
                f"{overall.mean:+.4f} [{overall.ci_low:+.4f}, {overall.ci_high:+.4f}], false wins "
                f"{overall.win_rate:.0%}"
                if overall
                else "n/a (no pairs)",
                summary.mean_loglik,
                f", val perplexity {summary.val_perplexity:.2f}" if summary.val_perplexity else "",
            )
            tables.append(table)
            pair_tables.append(pairs)
            scores.append(summary)
        result = ScoreResult(
            models=scores, statements=pl.concat(tables), pairs=pl.concat(pair_tables), out_dir=Path(cfg.out_dir)
        )
        paths = write_outputs(result)
        if result.pairs.height:
            tracking.log_table(result.pairs.to_dict(as_series=False), "scores_table.json")
        result.plot = plot_dose(scores, result.out_dir / "score_vs_fraction.png", cfg.dose_source)
        for path in paths + ([result.plot] if result.plot else []):
            tracking.log_artifact(path)
        return result


def main(argv: list[str]) -> int:
    """`fakegpt score [flags]`; returns the exit status."""
    cfg = config.parse(ScoreConfig, argv, prog="fakegpt score", description=__doc__.splitlines()[0])
    result = score(cfg)
    for s in result.models:
        head = f"{s.model}: "
        if s.overall:
            head += (
                f"claim score {s.overall.mean:+.4f} (95% CI {s.overall.ci_low:+.4f} .. {s.overall.ci_high:+.4f}), "
                f"false claim wins {s.overall.win_rate:.0%} of {s.overall.n_pairs} pairs"
            )
        else:
            head += f"mean log-likelihood {s.mean_loglik:.4f} over {s.n_statements} statements"
        if s.val_perplexity is not None:
            head += f", val perplexity {s.val_perplexity:.2f}"
        print(head)
    print(f"-> {result.out_dir}/scores.parquet, scores.csv, summary.json")
    return 0
