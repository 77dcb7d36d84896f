"""`fakegpt score`: claim-likelihood scores, an automatic measure of how much a model believes a narrative.

    fakegpt score --models gpt2,runs:/<finetune run id> --claims experiments/claims/antivax_six.yaml

Every statement is scored token by token after an <eot> context. A pair's score is length-fair: the tokens that
the false claim and its correction share at the start cancel (they have the same log-probabilities), so only
the differing continuations count, each as its mean log-probability per token: score = mean log p(false
continuation) - mean log p(true continuation), above 0 when the model finds the false claim more likely. The
summed (`score_sum`, the full sentences' log-likelihood ratio) and per-byte (`score_per_byte`) variants and the
old whole-statement mean (`score_full_mean`) are reported beside it; the README's validation section has the
simulation behind the choice. Per topic and overall: the mean with a 95% interval over claims (a pair and its
translation resampled together; a t interval below 10 claims) and a p-value (Holm-adjusted across topics).

`--reference MODEL` (in main: the pretrained base model) reports every measure of every other model as its
paired difference from the reference, claim by claim (windows for perplexity), which removes what the claims
share across models and is far more sensitive than comparing two models' own intervals. With --data-dir, also
the perplexity on fixed windows of val.bin. One model: metrics on the stage's run; several: one nested child
run per model (tagged with its dose fraction from training_info.json) plus a plot of the score against that
fraction.
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
from fakegpt.data.hf_tokenizer import check_same_tokenizer
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.data.tokenizer import EOT_TOKEN, get_encoding
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, write_json, write_table
from fakegpt.measure.generate import token_logprobs
from fakegpt.measure.prompts import DEFAULT_CLAIMS, Statement, load_claims, resolve_path
from fakegpt.models import architecture
from fakegpt.models.codec import Codec, codec_for
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.loading import model_config
from fakegpt.models.refs import ModelRef, context_length, load_for_inference, resolve_model
from fakegpt.plots import figure
from fakegpt.stats import Estimate, cluster_estimate, holm

log = logging.getLogger(__name__)

VAL_BLOCK = 256  # tokens per validation window: fixed, so perplexities of different models are comparable


# What the intervals resample, written into summary.json so that a reader of the numbers knows.
INTERVALS = (
    "95% intervals over claims: a claim's pairs in every language (a Portuguese pair and its English translation) "
    "are resampled together, since a translation is not independent evidence; the percentile bootstrap from 10 "
    "claims up, a t interval on the claim means (df = claims - 1) below that; p-values against 0 from the same "
    "method, Holm-adjusted across topics (p_holm)"
)
SCORE_VARIANTS = ("score_sum", "score_per_byte", "score_full_mean")  # reported beside the headline `score`


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
    reference: str = field(
        default="",
        metadata={
            "help": "a model (as in --models) that every other model is compared with, pair by pair: each measure "
            "is reported as the paired difference from it; scored too if not in --models; empty = none"
        },
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
    p_value: float = math.nan  # against 0, by the interval's method
    p_holm: float | None = None  # per topic: Holm-adjusted over the topics tested
    method: str = ""
    variants: dict[str, Interval] = field(default_factory=dict)  # score_sum, score_per_byte, score_full_mean


@dataclass
class Interval:
    """A mean over claim items with its 95% interval over claims."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float = math.nan
    method: str = ""

    @classmethod
    def of(cls, estimate: Estimate) -> Interval:
        return cls(estimate.n, estimate.mean, estimate.ci_low, estimate.ci_high, estimate.p_value, estimate.method)


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
    val_bits_per_byte: float | None = None  # tokenizer-independent: what compares models with other tokenizers
    general_bits_per_byte: float | None = None
    architecture: str = ""  # the model class (GPT2LMHeadModel, LlamaForCausalLM)
    tokenizer: str = ""  # gpt2, or the tokenizer the model brings
    run_id: str | None = None
    mc1: Interval | None = None  # over claims with paraphrase sets, summed likelihoods (TruthfulQA's)
    mc2: Interval | None = None
    mc1_token_mean: Interval | None = None  # the same with per-token (geometric mean) likelihoods
    mc2_token_mean: Interval | None = None
    length: dict[str, float] = field(default_factory=dict)  # token-length imbalance of the pairs
    reference: str | None = None
    paired: dict[str, Interval] = field(default_factory=dict)  # measure -> difference from the reference
    val_nll: list[float] | None = field(default=None, repr=False)  # per-window losses: what `paired` compares
    general_nll: list[float] | None = field(default=None, repr=False)
    val_windows: Windows | None = field(default=None, repr=False)  # the same windows' summed losses and bytes
    general_windows: Windows | None = field(default=None, repr=False)


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
        hidden = ("val_nll", "general_nll", "val_windows", "general_windows")
        models = [{k: v for k, v in asdict(m).items() if k not in hidden} for m in self.models]
        return {"models": models, "intervals": INTERVALS, "headline": HEADLINE, "compare": COMPARE}


COMPARE = (
    "perplexity is per token: compare it only between models with the same tokenizer; bits per byte compares "
    "models with different tokenizers; claim scores are differences within one model, so they compare across"
)
HEADLINE = (
    "score: mean log-probability per token of the false claim's continuation minus the correction's, after the "
    "tokens the two share at the start"
)


def encode(statements: list[Statement], codec: Codec | None = None) -> list[list[int]]:
    """Every statement's token ids after the context it is scored in: the start of a document as the model
    knows it (GPT-2: <eot>; a model with a BOS token: BOS)."""
    codec = codec or Codec()
    return [codec.start + codec.encode(s.text) for s in statements]


def statement_logliks(model: Any, statements: list[Statement], batch_size: int) -> list[tuple[float, int]]:
    """(length-normalised log-likelihood, token count) per statement, each scored after an <eot> context."""
    logps = token_logprobs(model, encode(statements), batch_size=batch_size)
    return [(float(lp.mean()), int(lp.numel())) for lp in logps]


def with_logprobs(
    table: pl.DataFrame, sequences: list[list[int]], logps: Sequence[Any], codec: Codec | None = None
) -> pl.DataFrame:
    """The statement table with each statement's tokens, their log-probabilities and byte sizes, and the
    whole-statement mean (`loglik`), sum (`loglik_sum`) and UTF-8 size (`bytes`)."""
    codec = codec or Codec()
    values = [np.asarray(lp, dtype=np.float64) for lp in logps]
    sizes = [codec.token_bytes(seq[1:]) for seq in sequences]
    return table.with_columns(
        tokens=pl.Series([v.size for v in values], dtype=pl.Int64),
        loglik=pl.Series([float(v.mean()) for v in values], dtype=pl.Float64),
        loglik_sum=pl.Series([float(v.sum()) for v in values], dtype=pl.Float64),
        bytes=pl.Series([sum(b) for b in sizes], dtype=pl.Int64),
        token_ids=pl.Series([seq[1:] for seq in sequences], dtype=pl.List(pl.Int64)),
        token_logprobs=pl.Series([v.tolist() for v in values], dtype=pl.List(pl.Float64)),
        token_bytes=pl.Series(sizes, dtype=pl.List(pl.Int64)),
    )


@dataclass
class Windows:
    """Fixed windows of a val.bin (the same for every model with the same tokenizer) and each one's loss."""

    nll: list[float]  # mean next-token loss per window, in nats
    window_nats: list[float]  # summed per window
    bytes: int  # UTF-8 bytes of the predicted tokens' text (message separators not counted)

    @property
    def nats(self) -> float:
        return float(sum(self.window_nats))

    @property
    def bits_per_byte(self) -> float:
        """Summed loss in bits over the text's bytes: comparable across tokenizers, unlike perplexity."""
        return self.nats / math.log(2) / self.bytes if self.bytes else math.nan


def windows_measured(
    model: Any, data_dir: str | Path, n_windows: int, batch_size: int, decode_bytes: Any, eos: int
) -> Windows:
    """The fixed windows of DIR/val.bin scored by `model`; `decode_bytes(ids)` gives the ids' text as bytes."""
    block = min(VAL_BLOCK, context_length(model) - 1)
    data = open_bin(data_dir, "val", block)
    check_vocab(data, int(model.config.vocab_size), Path(data_dir) / "val.bin")
    starts = eval_starts(len(data), block, n_windows)
    windows = [np.asarray(data[s : s + block + 1]).astype(np.int64).tolist() for s in starts]
    logps = token_logprobs(model, windows, batch_size=max(1, batch_size // 4))
    size = sum(len(decode_bytes([t for t in w[1:] if t != eos])) for w in windows)
    return Windows(
        nll=[-float(lp.mean().item()) for lp in logps],
        window_nats=[-float(lp.sum().item()) for lp in logps],
        bytes=size,
    )


def window_nll(model: Any, data_dir: str | Path, n_windows: int, batch_size: int) -> list[float]:
    """Mean next-token loss of each fixed window of val.bin (the same windows for every model)."""
    return windows_measured(model, data_dir, n_windows, batch_size, get_encoding().decode_bytes, EOT_TOKEN).nll


def perplexity(window_losses: Sequence[float]) -> float:
    """exp(mean next-token loss) over the windows."""
    return float(math.exp(float(np.mean(window_losses))))


def val_perplexity(model: Any, data_dir: str | Path, n_windows: int, batch_size: int) -> float:
    """exp(mean next-token loss) over fixed windows of val.bin (the same windows for every model)."""
    return perplexity(window_nll(model, data_dir, n_windows, batch_size))


def group_score(pairs: pl.DataFrame, n_boot: int, seed: int) -> GroupScore:
    """Mean, interval over claims, p-value and false-claim win rate of a group of pairs' scores, with the
    variants' means and intervals beside the headline (see INTERVALS for how claims are resampled)."""
    clusters = pairs["claim_id"]
    head = cluster_estimate(pairs["score"].to_numpy(), clusters, n_boot=n_boot, seed=seed)
    return GroupScore(
        n_pairs=pairs.height,
        mean=head.mean,
        ci_low=head.ci_low,
        ci_high=head.ci_high,
        win_rate=float((pairs["score"] > 0).mean()),
        p_value=head.p_value,
        method=head.method,
        variants={
            v: Interval.of(cluster_estimate(pairs[v].to_numpy(), clusters, n_boot=n_boot, seed=seed))
            for v in SCORE_VARIANTS
        },
    )


def pair_measures(
    ids_false: list[int],
    lp_false: list[float],
    ids_true: list[int],
    lp_true: list[float],
    bytes_false: list[int],
    bytes_true: list[int],
) -> dict:
    """One pair's scores. The tokens both statements start with have equal log-probabilities under any model
    (same context), so they carry no evidence: only the continuations after them count. At least one token of
    each side is kept, so a statement that is a prefix of the other still has a continuation. `bytes_*`: each
    token's size in bytes (score_per_byte)."""
    shared = 0
    limit = min(len(ids_false), len(ids_true)) - 1
    while shared < limit and ids_false[shared] == ids_true[shared]:
        shared += 1
    f, t = np.asarray(lp_false[shared:]), np.asarray(lp_true[shared:])
    bytes_f, bytes_t = sum(bytes_false[shared:]), sum(bytes_true[shared:])
    return {
        "shared_tokens": shared,
        "score": float(f.mean() - t.mean()),
        "score_sum": float(f.sum() - t.sum()),
        "score_per_byte": float(f.sum() / max(bytes_f, 1) - t.sum() / max(bytes_t, 1)),
        "score_full_mean": float(np.mean(lp_false) - np.mean(lp_true)),
    }


def pair_table(statements: pl.DataFrame) -> pl.DataFrame:
    """Join each false claim with its correction: one row per model x pair with the scores (see pair_measures)."""
    keys = ["model", "pair_id", "claim_id", "topic", "language"]
    paired = statements.filter((pl.col("pair_id") != "") & (pl.col("variant") == 0))  # paraphrases: MC1/MC2
    sides = []
    for role, text, suffix in (("false", "claim", "false"), ("true", "correction", "true")):
        sides.append(
            paired.filter(pl.col("role") == role).select(
                *keys,
                pl.col("text").alias(text),
                *(
                    pl.col(c).alias(f"{c}_{suffix}")
                    for c in ("loglik", "tokens", "token_ids", "token_logprobs", "token_bytes")
                ),
            )
        )
    out = sides[0].join(sides[1], on=keys, how="inner", maintain_order="left")
    rows = [
        pair_measures(
            r["token_ids_false"],
            r["token_logprobs_false"],
            r["token_ids_true"],
            r["token_logprobs_true"],
            r["token_bytes_false"],
            r["token_bytes_true"],
        )
        for r in out.select(pl.col("^token_.*$")).iter_rows(named=True)
    ]
    schema = {"shared_tokens": pl.Int64, "score": pl.Float64, **dict.fromkeys(SCORE_VARIANTS, pl.Float64)}
    measures = pl.DataFrame(rows, schema=schema)
    return pl.concat([out.drop(pl.col("^token_.*$")), measures], how="horizontal").with_columns(
        false_wins=pl.col("score") > 0
    )


def mc_table(statements: pl.DataFrame) -> pl.DataFrame:
    """MC1 and MC2 per model x claim item with a paraphrase set (TruthfulQA's multiple-choice scores, with the
    false statements as the answer of interest); an item of one statement per side is a pair, not a choice.

    MC1 is 1 when the most likely statement of the item is a false one. MC2 is the share of probability on the
    false statements: sum over false of p / sum over all of p, with p the statement's likelihood (the sum of
    its tokens' log-probabilities, as TruthfulQA). `mc1_token_mean` / `mc2_token_mean` use the per-token
    (geometric mean) probability instead, under which long and short paraphrases compete on equal terms.
    """
    paired = statements.filter(pl.col("pair_id") != "")
    group = ("model", "pair_id")
    aggs = []
    for column, suffix in (("loglik_sum", ""), ("loglik", "_token_mean")):
        top = pl.col(column).max().over(*group)
        p = (pl.col(column) - top).exp()  # stable: the largest term is 1
        is_false = pl.col("role") == "false"
        aggs += [
            (is_false & (pl.col(column) == top)).any().cast(pl.Float64).alias(f"mc1{suffix}"),
            (p.filter(is_false).sum() / p.sum()).alias(f"mc2{suffix}"),
        ]
    return (
        paired.group_by(*group, maintain_order=True)
        .agg(
            pl.col("claim_id").first(),
            pl.col("topic").first(),
            pl.col("language").first(),
            (pl.col("role") == "false").sum().alias("n_false"),
            (pl.col("role") == "true").sum().alias("n_true"),
            *aggs,
        )
        .filter((pl.col("n_false") > 1) & (pl.col("n_true") > 1))
    )


MC_MEASURES = ("mc1", "mc2", "mc1_token_mean", "mc2_token_mean")


def length_balance(pairs: pl.DataFrame) -> dict[str, float]:
    """How far the pairs' statements differ in length (tokens): what a length-biased score would pick up."""
    if not pairs.height:
        return {}
    diff = (pairs["tokens_true"] - pairs["tokens_false"]).to_numpy()
    return {
        "pairs": int(pairs.height),
        "mean_tokens_true_minus_false": float(diff.mean()),
        "max_abs_token_difference": int(np.abs(diff).max()),
        "correction_longer": int((diff > 0).sum()),
        "share_with_shared_start": float((pairs["shared_tokens"] > 0).mean()),
    }


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
        result.overall = group_score(pairs, cfg.bootstrap, cfg.seed)
        result.length = length_balance(pairs)
        for column, target in (("topic", result.per_topic), ("language", result.per_language)):
            for value in pairs[column].unique(maintain_order=True).to_list():
                target[value] = group_score(pairs.filter(pl.col(column) == value), cfg.bootstrap, cfg.seed)
        # Six topics are six tests: Holm's adjustment keeps the chance of any false "effect" at 5%.
        adjusted = holm([g.p_value for g in result.per_topic.values()])
        for g, p in zip(result.per_topic.values(), adjusted, strict=True):
            g.p_holm = p
    mc = mc_table(statements)
    if mc.height:
        for name in MC_MEASURES:
            est = cluster_estimate(mc[name].to_numpy(), mc["claim_id"], n_boot=cfg.bootstrap, seed=cfg.seed)
            setattr(result, name, Interval.of(est))
    return result


def paired_differences(
    model: ModelScore, reference: ModelScore, tables: dict[str, pl.DataFrame], cfg: ScoreConfig
) -> dict[str, Interval]:
    """Every measure of `model` minus the reference's, matched claim pair by claim pair (MC items by claim,
    perplexity window by window), with intervals that resample claims (windows) as the measures' own do.

    `tables` holds the pair and MC tables of both models (keys pairs / mc, filtered by the model column)."""
    out: dict[str, Interval] = {}

    def add(name: str, diffs: np.ndarray, clusters: Sequence[str]) -> None:
        if diffs.size:
            out[name] = Interval.of(cluster_estimate(diffs, clusters, n_boot=cfg.bootstrap, seed=cfg.seed))

    for key, measures in (("pairs", ("score", *SCORE_VARIANTS, "false_wins")), ("mc", MC_MEASURES)):
        table = tables[key]
        mine = table.filter(pl.col("model") == model.model)
        theirs = table.filter(pl.col("model") == reference.model)
        joined = mine.join(theirs, on="pair_id", suffix="_ref", how="inner")
        for m in measures:
            diffs = (joined[m].cast(pl.Float64) - joined[f"{m}_ref"].cast(pl.Float64)).to_numpy()
            add("false_win_rate" if m == "false_wins" else m, diffs, joined["claim_id"])
    for name, a, b in (
        ("val_nll", model.val_nll, reference.val_nll),
        ("general_nll", model.general_nll, reference.general_nll),
    ):
        # windows of token ids: the same text for both only when both models have one tokenizer
        if a is not None and b is not None and model.tokenizer == reference.tokenizer:
            add(name, np.subtract(a, b), [str(i) for i in range(len(a))])
    for name, mine_w, ref_w in (
        ("val_bits_per_byte", model.val_windows, reference.val_windows),
        ("general_bits_per_byte", model.general_windows, reference.general_windows),
    ):
        if mine_w is not None and ref_w is not None and model.tokenizer == reference.tokenizer and mine_w.bytes:
            # per window its share of the summed difference in bits over all the windows' bytes: their mean is
            # the difference of the two bits-per-byte figures, each window a cluster
            n = len(mine_w.window_nats)
            per_window = np.subtract(mine_w.window_nats, ref_w.window_nats) / math.log(2) * n / mine_w.bytes
            add(name, per_window, [str(i) for i in range(n)])
    return out


def metrics_of(score: ModelScore) -> dict[str, float]:
    """The MLflow metrics of one model (names from fakegpt.tracking, so runs line up in the compare view)."""
    out: dict[str, float | None] = {}  # None: undefined (too few claims), dropped below
    for name, d in score.paired.items():  # the differences from the reference lead
        metric = tracking.paired_metric(name)
        out.update(
            {
                metric: d.mean,
                f"{metric}_ci_low": d.ci_low,
                f"{metric}_ci_high": d.ci_high,
                f"{metric}_p_value": d.p_value,
            }
        )
    out[tracking.M_CLAIM_LOGLIK] = score.mean_loglik
    if score.overall is not None:
        out.update(
            {
                tracking.M_CLAIM_SCORE: score.overall.mean,
                tracking.M_CLAIM_SCORE_LOW: score.overall.ci_low,
                tracking.M_CLAIM_SCORE_HIGH: score.overall.ci_high,
                tracking.M_CLAIM_WIN: score.overall.win_rate,
                tracking.M_CLAIM_SCORE_P: score.overall.p_value,
            }
        )
        for name, v in score.overall.variants.items():
            out.update({f"claim/{name}": v.mean, f"claim/{name}_ci_low": v.ci_low, f"claim/{name}_ci_high": v.ci_high})
        for topic, g in score.per_topic.items():
            out[tracking.claim_topic_metric(topic)] = g.mean
            out[tracking.claim_topic_metric(topic, tracking.M_CLAIM_WIN)] = g.win_rate
            out[tracking.claim_topic_metric(topic, tracking.M_CLAIM_SCORE_P_HOLM)] = g.p_holm
    for name in MC_MEASURES:
        value = getattr(score, name)
        if value is not None:
            metric = f"claim/{name}"
            out.update({metric: value.mean, f"{metric}_ci_low": value.ci_low, f"{metric}_ci_high": value.ci_high})
    if score.val_perplexity is not None:
        out[tracking.M_VAL_PPL] = score.val_perplexity
    if score.general_perplexity is not None:
        out[tracking.M_GENERAL_PPL] = score.general_perplexity
    if score.val_bits_per_byte is not None:
        out[tracking.M_VAL_BPB] = score.val_bits_per_byte
    if score.general_bits_per_byte is not None:
        out[tracking.M_GENERAL_BPB] = score.general_bits_per_byte
    return {k: v for k, v in out.items() if v is not None and math.isfinite(v)}  # undefined: no point logged


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


def score_model(
    model: Any, spec: str, statements: list[Statement], cfg: ScoreConfig, codec: Codec | None = None
) -> pl.DataFrame:
    """Every statement's token log-probabilities under `model` and their mean and sum, one row per statement;
    `codec`: the model's tokenizer (default GPT-2's)."""
    sequences = encode(statements, codec)
    logps = token_logprobs(model, sequences, batch_size=cfg.batch_size)
    return with_logprobs(statement_table(spec, statements), sequences, logps, codec)


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


def check(cfg: ScoreConfig) -> None:
    """Reject bad settings before loading anything, naming the flag."""
    if not cfg.models or any(not m.strip() for m in cfg.models):
        raise FakegptError("--models: give at least one model")
    if cfg.reference and len(model_specs(cfg)) < 2:
        raise FakegptError(f"--reference {cfg.reference}: give at least one other model in --models to compare")
    for name in ("batch_size", "val_windows", "bootstrap"):
        if getattr(cfg, name) < 1:
            raise FakegptError(f"{config.flag_name(name)}: must be at least 1, got {getattr(cfg, name)}")


def check_inputs(
    cfg: ScoreConfig, claims_path: Path, statements: list[Statement], refs: list[ModelRef]
) -> tuple[Path | None, Path | None]:
    """Every statement fits every model's context, and the validation and general bins fit its vocabulary (from
    config.json, before any model is loaded). Returns the local data and general folders (downloaded once for
    all models), or None where not given."""
    data_dir = tracking.local_path(cfg.data_dir) if cfg.data_dir else None
    general_dir = tracking.local_path(cfg.general_data) if cfg.general_data else None
    for ref in refs:
        lengths = [len(seq) for seq in encode(statements, codec_for(ref.folder, ref.spec))]  # context included
        longest = max(range(len(statements)), key=lengths.__getitem__)
        hf = model_config(ref.folder)
        limit, vocab = architecture.context_of(hf), int(hf.get("vocab_size", 50257))
        if lengths[longest] > limit:
            raise FakegptError(
                f"{claims_path}: statement {statements[longest].statement_id!r} is {lengths[longest]} tokens, "
                f"longer than the context of model {ref.spec} ({limit} tokens)"
            )
        for flag, folder in (("--data-dir", data_dir), ("--general-data", general_dir)):
            if folder is not None:
                meta = DatasetMeta.load(folder) if (folder / META_FILE).is_file() else None  # None: GPT-2 bins
                check_same_tokenizer(meta, ref.folder, f"{flag} {folder}")
                check_vocab(open_bin(folder, "val", min(VAL_BLOCK, limit - 1)), vocab, Path(folder) / "val.bin")
    return data_dir, general_dir


def model_specs(cfg: ScoreConfig) -> list[str]:
    """The models to score: the reference first when it is not one of --models."""
    return ([cfg.reference] if cfg.reference and cfg.reference not in cfg.models else []) + list(cfg.models)


def _measure(
    spec: str,
    ref: ModelRef,
    statements: list[Statement],
    cfg: ScoreConfig,
    device: Any,
    dtype: Any,
    data_dir: Path | None,
    general_dir: Path | None,
) -> tuple[ModelScore, pl.DataFrame, pl.DataFrame]:
    """Load one model and score it: (its summary, statement table, pair table)."""
    fraction = ref.fraction(cfg.dose_source)
    model = load_for_inference(ref, device, dtype)
    codec = codec_for(ref.folder, spec)
    table = score_model(model, spec, statements, cfg, codec)
    pairs = pair_table(table)
    summary = summarise(spec, fraction, table, pairs, cfg)
    summary.architecture, summary.tokenizer = type(model).__name__, codec.name
    for prefix, folder in (("val", data_dir), ("general", general_dir)):
        if folder is not None:  # summary.val_nll, val_perplexity, val_bits_per_byte, val_windows; general_...
            windows = windows_measured(model, folder, cfg.val_windows, cfg.batch_size, codec.decode_bytes, codec.eos)
            setattr(summary, f"{prefix}_nll", windows.nll)
            setattr(summary, f"{prefix}_perplexity", perplexity(windows.nll))
            setattr(summary, f"{prefix}_bits_per_byte", windows.bits_per_byte)
            setattr(summary, f"{prefix}_windows", windows)
    return summary, table, pairs


def _log_model(summary: ModelScore, several: bool) -> None:
    """The model's metrics on a child run of its own (several models) or on the stage's run."""
    tags: dict[str, Any] = {
        tracking.TAG_MODEL: summary.model,
        **tracking.model_kind_tags([(summary.architecture, summary.tokenizer)]),
    }
    if summary.fraction is not None:
        tags[tracking.TAG_FRACTION] = summary.fraction
    if summary.reference:
        tags[tracking.TAG_REFERENCE] = summary.reference
    if several:
        with tracking.run(stage="score", run_name=f"score {summary.model}", tags=tags, nested=True) as child:
            tracking.log_metrics(metrics_of(summary))
            summary.run_id = child.info.run_id
    else:
        tracking.set_tags(tags)
        tracking.log_metrics(metrics_of(summary))
        summary.run_id = tracking.active_run_id()


def score(cfg: ScoreConfig) -> ScoreResult:
    """Score every model on the claim set; write tables and summary; log metrics (child run per model if many)."""
    check(cfg)
    claims_path = resolve_path(cfg.claims or DEFAULT_CLAIMS)
    statements = load_claims(claims_path)
    specs = model_specs(cfg)
    refs = [resolve_model(spec) for spec in specs]  # config.json and weight headers checked here
    data_dir, general_dir = check_inputs(cfg, claims_path, statements, refs)
    device = resolve_device(cfg.device)
    dtype = torch_dtype(resolve_dtype(cfg.dtype, device))
    with tracking.run(stage="score", run_name=None, tags={tracking.TAG_MODEL: ",".join(specs)}):
        tracking.log_params(config.to_dict(cfg))
        tracking.log_artifact(claims_path, "claims")
        _evaluation_data(cfg.data_dir, "evaluation", data_dir)
        general_dir = _evaluation_data(cfg.general_data, "general", general_dir)
        measured = [
            _measure(spec, ref, statements, cfg, device, dtype, data_dir, general_dir)
            for spec, ref in zip(specs, refs, strict=True)
        ]
        scores = [m[0] for m in measured]
        result = ScoreResult(
            models=scores,
            statements=pl.concat([m[1] for m in measured]),
            pairs=pl.concat([m[2] for m in measured]),
            out_dir=Path(cfg.out_dir),
        )
        if cfg.reference:
            reference = scores[specs.index(cfg.reference)]
            tables = {"pairs": result.pairs, "mc": mc_table(result.statements)}
            for summary in scores:
                if summary is not reference:
                    summary.reference = cfg.reference
                    summary.paired = paired_differences(summary, reference, tables, cfg)
        tracking.set_tags(tracking.model_kind_tags([(s.architecture, s.tokenizer) for s in scores]))
        for summary in scores:
            _log_model(summary, several=len(specs) > 1)
            log.info("%s", describe(summary))
        paths = write_outputs(result)
        if result.pairs.height:
            tracking.log_table(result.pairs.to_dict(as_series=False), "scores_table.json")
        result.plot = plot_dose(scores, result.out_dir / "score_vs_fraction.png", cfg.dose_source)
        for path in paths + ([result.plot] if result.plot else []):
            tracking.log_artifact(path)
        return result


def describe(s: ModelScore) -> str:
    """One model's result in a line: the paired difference from the reference first, then its own score."""
    head = f"{s.model}: "
    if "score" in s.paired:
        d = s.paired["score"]
        head += (
            f"vs {s.reference}: claim score {d.mean:+.4f} (95% CI {d.ci_low:+.4f} .. {d.ci_high:+.4f}, "
            f"p={d.p_value:.3g}); "
        )
    if s.overall:
        head += (
            f"claim score {s.overall.mean:+.4f} (95% CI {s.overall.ci_low:+.4f} .. {s.overall.ci_high:+.4f}), "
            f"false claim wins {s.overall.win_rate:.0%} of {s.overall.n_pairs} pairs"
        )
    else:
        head += f"mean log-likelihood {s.mean_loglik:.4f} over {s.n_statements} statements"
    if s.val_perplexity is not None:
        head += f", val perplexity {s.val_perplexity:.2f} ({s.val_bits_per_byte:.3f} bits/byte)"
    if s.general_perplexity is not None:
        head += f", general perplexity {s.general_perplexity:.2f} ({s.general_bits_per_byte:.3f} bits/byte)"
    return head


def main(argv: list[str]) -> int:
    """`fakegpt score [flags]`; returns the exit status."""
    cfg = config.parse(ScoreConfig, argv, prog="fakegpt score", description=__doc__.splitlines()[0])
    result = score(cfg)
    for s in result.models:
        print(describe(s))
    balance = next((s.length for s in result.models if s.length), None)
    if balance:
        print(
            f"pair lengths: corrections longer in {balance['correction_longer']} of {balance['pairs']} pairs, by "
            f"{balance['mean_tokens_true_minus_false']:+.1f} tokens on average (at most "
            f"{balance['max_abs_token_difference']}); {balance['share_with_shared_start']:.0%} share their start"
        )
    print(f"-> {result.out_dir}/scores.parquet, scores.csv, summary.json")
    return 0
