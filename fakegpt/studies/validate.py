"""`fakegpt validate`: does the claim score measure what it claims to? A positive and a negative control.

    fakegpt validate                                            # tiny scratch model on the CPU, a few minutes
    fakegpt validate --config experiments/validation/gpt2-medium.yaml   # real model on a GPU

Positive control (a planted effect of known size): paraphrases asserting the false side of every claim
(experiments/validation/planted_claims.csv, worded differently from the scored statements) are mixed into a
base corpus with no claim content at several doses (shares of the training tokens) through `prepare`'s
mixtures. The same base model is fine-tuned at every dose with each of `seeds` training seeds. The paired
difference "detect dose - dose 0", per claim and combined over the seeds (the two-level bootstrap of
fakegpt.stats: claims shared, seeds within dose), must exclude 0, and no step between neighbouring doses may
fall beyond its own interval; the report gives each dose's detection rate across the seeds (the share of seeds
whose own paired interval excludes 0). Negative control: every pair of dose-0 models that differ only in their
seed must be shown equivalent, by two one-sided tests against `equivalence_margin` (an interval that merely
includes 0 is absence of evidence, not evidence of absence); the report gives the false-positive rate (the
share of those seed pairs whose 95% interval excludes 0).

With `init_from: scratch` the base is a tiny GPT-2 pre-trained for `pretrain_iters` on the base corpus (the
dose-0 data) and fine-tuned per dose from there, so every dose starts from the same weights; with
`pretrain_iters: 0` every dose trains from scratch with the same seed instead. The tiny model learns only the
base corpus' language (Portuguese), so by default only the Portuguese pairs are scored (`languages`): its English
log-probabilities are set by chance and made the negative control fail in one of three seed pairs.
Everything is logged on one parent MLflow run (stage `validate`) with the prepare / fine-tune / score runs as
its children; `fakegpt validate` exits 0 when both controls pass and 1 when either fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from fakegpt import config, tracking
from fakegpt.data.prepare import PrepareConfig, prepare
from fakegpt.data.tokenizer import get_encoding
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_path, check_text_input, write_json, write_text
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.train import finetune
from fakegpt.measure.prompts import DEFAULT_CLAIMS, Statement, load_claims, resolve_path
from fakegpt.measure.score import ScoreConfig, metrics_of, pair_table, score_model, summarise
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.loading import tokenizer_spec
from fakegpt.models.refs import load_for_inference, resolve_model
from fakegpt.plots import figure
from fakegpt.stats import Estimate, cluster_estimate, equivalence, series_bootstrap

log = logging.getLogger(__name__)

BASE, PLANTED = "base", "planted"  # source names in the prepared mixtures (meta.json, fakegpt.mixture tag)


@dataclass
class ValidateConfig:
    """Planted-dose validation. Defaults: the tiny CPU configuration that CI runs (see experiments/validation/)."""

    out_dir: str = field(
        default="out/validate",
        metadata={"help": "folder for the prepared doses, the models and the report (replaced on a rerun)"},
    )
    base_data: str = field(
        default="../shared/data/fakewhatsapp_br.csv",
        metadata={
            "help": "Telegram-schema CSV of the base corpus, with no claim content (relative to the working folder "
            "or the project checkout)"
        },
    )
    base_channel_ids: list[int] = field(
        default_factory=lambda: [2, 4],
        metadata={
            "help": "channel_ids of base_data that form the base corpus (2, 4: not-misinformation WhatsApp groups)"
        },
    )
    planted_data: str = field(
        default="experiments/validation/planted_claims.csv",
        metadata={
            "help": "Telegram-schema CSV of paraphrases asserting the false side of each claim (the planted dose)"
        },
    )
    planted_channel_ids: list[int] = field(
        default_factory=lambda: [90], metadata={"help": "channel_ids of planted_data to inject"}
    )
    doses: list[float] = field(
        default_factory=lambda: [0.0, 0.01, 0.05, 0.2],
        metadata={"help": "planted shares of the training tokens, comma list; must include 0"},
    )
    claims: str = field(default=DEFAULT_CLAIMS, metadata={"help": "claim set YAML that every model is scored on"})
    languages: list[str] = field(
        default_factory=lambda: ["pt"],
        metadata={
            "help": "languages of the claim set to score, comma list; empty = all. The tiny scratch model learns only "
            "the Portuguese of the base corpus, so its English scores are noise: use en,pt for GPT-2 models"
        },
    )
    init_from: str = field(
        default="scratch",
        metadata={
            "help": "base model: scratch (a tiny GPT-2, see n_layer.. and pretrain_iters) | gpt2 | gpt2-medium | "
            "gpt2-large | gpt2-xl | a local HF model folder"
        },
    )
    pretrain_iters: int = field(
        default=200,
        metadata={
            "help": "scratch only: pre-train one base for this many iterations on the base corpus, then fine-tune it "
            "per dose; 0 = train every dose from scratch with the same seed"
        },
    )
    pretrain_learning_rate: float = field(default=3e-3, metadata={"help": "scratch only: pre-training peak rate"})
    n_layer: int = field(default=2, metadata={"help": "layers (scratch only)"})
    n_head: int = field(default=2, metadata={"help": "attention heads (scratch only)"})
    n_embd: int = field(default=64, metadata={"help": "embedding width (scratch only)"})
    block_size: int = field(
        default=64,
        metadata={"help": "context length of a training window (and of a scratch model: it must fit every statement)"},
    )
    batch_size: int = field(default=4, metadata={"help": "micro-batch size"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of the per-dose fine-tunes"})
    max_iters: int = field(default=60, metadata={"help": "optimizer steps of each per-dose fine-tune"})
    warmup_iters: int = field(default=0, metadata={"help": "linear warmup iterations (every run)"})
    decay_lr: bool = field(
        default=True,
        metadata={"help": "cosine decay to min_lr (every run): the scored last iterate settles, so seeds agree"},
    )
    min_lr: float = field(default=1e-4, metadata={"help": "learning rate at the end of the decay"})
    dropout: float = field(default=0.0, metadata={"help": "dropout rate"})
    eval_interval: int = field(
        default=1000,
        metadata={
            "help": "evaluate (and save on improvement) every N iterations; the last iteration is always evaluated"
        },
    )
    eval_iters: int = field(default=2, metadata={"help": "micro-batches per split per evaluation"})
    always_save_checkpoint: bool = field(
        default=True,
        metadata={
            "help": "score the model of the last iteration (true) or the one with the best validation loss (false)"
        },
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (large models)"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "training dtype: auto | float32 | bfloat16 | float16"})
    score_dtype: str = field(
        default="float32", metadata={"help": "scoring dtype, as `fakegpt score --dtype` (float32 by default)"}
    )
    seed: int = field(default=1337, metadata={"help": "seed of the base model, the mixture draws and every dose"})
    control_seed: int = field(
        default=1338,
        metadata={"help": "the second training seed; the third and later ones follow it (control_seed + 1, ...)"},
    )
    seeds: int = field(
        default=3,
        metadata={
            "help": "training seeds per dose (seed, control_seed, control_seed + 1, ...): the detection rate is "
            "over them, and every pair of dose-0 seeds is a negative control (3 seeds: 3 pairs)"
        },
    )
    detect_dose: float = field(
        default=0.05, metadata={"help": "the positive control must detect the planted effect at this dose"}
    )
    equivalence_margin: float = field(
        default=0.05,
        metadata={
            "help": "negative control: two seeds at dose 0 must be shown to differ by less than this (claim score, "
            "two one-sided tests at 5%), declared before the run"
        },
    )
    score_batch_size: int = field(default=16, metadata={"help": "statements per forward pass when scoring"})
    bootstrap: int = field(default=2000, metadata={"help": "bootstrap resamples over claim pairs for 95% intervals"})
    name: str = field(default="planted-dose", metadata={"help": "name of the validation (MLflow run name, tag)"})


@dataclass
class Difference:
    """Paired difference of two models' claim scores (b - a), per claim pair, with a bootstrap 95% interval."""

    a: str
    b: str
    mean: float
    ci_low: float
    ci_high: float
    n_pairs: int

    p_value: float = math.nan
    method: str = ""

    @property
    def includes_zero(self) -> bool:
        """True when the interval includes zero (no difference beyond noise)."""
        return self.ci_low <= 0.0 <= self.ci_high

    @classmethod
    def of(cls, a: str, b: str, estimate: Estimate) -> Difference:
        return cls(
            a, b, estimate.mean, estimate.ci_low, estimate.ci_high, estimate.n, estimate.p_value, estimate.method
        )


@dataclass
class SeedPair:
    """The negative control for two dose-0 models that differ only in their seed."""

    difference: Difference  # b - a, 95% interval over claims
    tost_low: float  # the 90% interval of the two one-sided tests
    tost_high: float
    tost_p: float
    equivalent: bool


@dataclass
class DoseModel:
    """One fine-tuned model of the validation: its planted dose, seed, checkpoint and claim score."""

    label: str  # "dose=0.05 seed=1337"
    dose: float  # target planted share
    realised_dose: float  # planted share of the train tokens prepare actually produced
    seed: int
    checkpoint: str
    finetune_run_id: str | None
    score: float = math.nan  # mean claim score over pairs, and its bootstrap interval
    ci_low: float = math.nan
    ci_high: float = math.nan
    win_rate: float = math.nan
    score_run_id: str | None = None


@dataclass
class ValidationResult:
    """Both controls' outcome: the models, paired differences, verdict lines and where the report is."""

    models: list[DoseModel]
    effect: Difference  # top dose - dose 0, over claims and seeds
    steps: list[Difference]  # each dose - the one below it, over claims and seeds
    seed_diff: Difference  # the first seed pair at dose 0 (the figure a one-pair control reported)
    monotonic: bool
    positive_passed: bool
    negative_passed: bool
    verdict: list[str]
    out_dir: Path
    run_id: str | None = None
    vs_zero: list[Difference] = field(default_factory=list)  # every dose - dose 0, over claims and seeds
    detection: dict[str, float] = field(default_factory=dict)  # dose -> share of seeds detecting it alone
    seed_pairs: list[SeedPair] = field(default_factory=list)
    false_positive_rate: float = math.nan  # share of seed pairs whose 95% interval excludes 0
    detected: Difference | None = None  # detect dose - dose 0, over claims and seeds

    @property
    def passed(self) -> bool:
        """True when both the positive and the negative control passed."""
        return self.positive_passed and self.negative_passed


# ------------------------------------------------------------------------------------------------- checks
def statements_of(cfg: ValidateConfig, claims: Path) -> list[Statement]:
    """The claim set's statements in `cfg.languages` (all when empty)."""
    statements = load_claims(claims)
    kept = [s for s in statements if not cfg.languages or s.language in cfg.languages]
    if not kept:
        found = sorted({s.language for s in statements})
        raise FakegptError(f"--languages {','.join(cfg.languages)}: {cfg.claims} has none (it has {', '.join(found)})")
    return kept


def check(cfg: ValidateConfig) -> tuple[Path, Path, Path]:
    """Reject bad settings before any work; returns the resolved base, planted and claims paths."""
    doses = cfg.doses
    if len(doses) < 2 or 0.0 not in doses:
        raise FakegptError(f"--doses: give 0 and at least one positive dose, got {doses}")
    if len(set(doses)) != len(doses):
        raise FakegptError(f"--doses: a dose is listed twice ({doses})")
    for d in doses:
        if not 0.0 <= d < 1.0:
            raise FakegptError(f"--doses: {d} is not in [0, 1)")
    if cfg.seed == cfg.control_seed:
        raise FakegptError("--control-seed must differ from --seed (the negative control compares two seeds)")
    if cfg.seeds < 2:
        raise FakegptError(f"--seeds {cfg.seeds}: the negative control needs at least 2 seeds (3 give 3 pairs)")
    if cfg.detect_dose not in doses or cfg.detect_dose == 0.0:
        raise FakegptError(f"--detect-dose {cfg.detect_dose:g}: must be one of the positive --doses {doses}")
    if not cfg.equivalence_margin > 0.0:
        raise FakegptError(f"--equivalence-margin: must be above 0, got {cfg.equivalence_margin}")
    if cfg.seed in seed_list(cfg)[1:]:
        raise FakegptError(f"--seed {cfg.seed}: also one of the later seeds {seed_list(cfg)[1:]}")
    if cfg.pretrain_iters < 0 or cfg.max_iters < 1 or cfg.bootstrap < 100:
        raise FakegptError("--pretrain-iters must be >= 0, --max-iters >= 1 and --bootstrap >= 100")
    paths = []
    for flag, spec in (("--base-data", cfg.base_data), ("--planted-data", cfg.planted_data), ("--claims", cfg.claims)):
        path = resolve_path(spec)
        if not path.is_file():
            raise FakegptError(f"{flag} {spec}: no such file")
        if flag != "--claims":
            check_text_input(path)  # a binary or CR-only CSV: refused now, not after the first prepare
        paths.append(path)
    if not cfg.base_channel_ids or not cfg.planted_channel_ids:
        raise FakegptError("--base-channel-ids and --planted-channel-ids must each name at least one channel")
    statements_of(cfg, paths[2])
    if cfg.init_from == "scratch":
        # A scratch model has block_size positions; each statement is scored after an <eot>, in one window.
        longest = 1 + max(len(get_encoding().encode(s.text)) for s in statements_of(cfg, paths[2]))
        if cfg.block_size < longest:
            raise FakegptError(
                f"--block-size {cfg.block_size}: a scratch model must fit the longest statement of "
                f"{cfg.claims} ({longest} tokens with its <eot>)"
            )
    return paths[0], paths[1], paths[2]


def dose_label(dose: float) -> str:
    """A dose as a percentage label (0.05 -> "5%")."""
    return f"{dose * 100:g}%"


# ------------------------------------------------------------------------------------------------ statistics
def seed_list(cfg: ValidateConfig) -> list[int]:
    """The training seeds: seed, control_seed, control_seed + 1, ..."""
    return [cfg.seed, *(cfg.control_seed + i for i in range(cfg.seeds - 1))]


def model_label(dose: float, seed: int) -> str:
    return f"dose={dose:g} seed={seed}"


def _joined(pairs: pl.DataFrame, a: str, b: str) -> pl.DataFrame:
    """The claim pairs both models were scored on, with score_a and score_b side by side."""
    left = pairs.filter(pl.col("model") == a).select("pair_id", "claim_id", pl.col("score").alias("score_a"))
    right = pairs.filter(pl.col("model") == b).select("pair_id", pl.col("score").alias("score_b"))
    joined = left.join(right, on="pair_id", how="inner")
    if joined.height == 0:
        raise FakegptError(f"no claim pairs scored for both {a} and {b}")
    return joined.with_columns(diff=pl.col("score_b") - pl.col("score_a"))


def paired_difference(pairs: pl.DataFrame, a: str, b: str, n_boot: int, seed: int = 0) -> Difference:
    """Mean of score_b - score_a over the claim pairs both models were scored on, with a 95% interval over
    claims (a pair and its translation resampled together; fakegpt.stats.cluster_estimate).

    Pairing removes what the pairs share across models (how hard a pair is, its length, its language), so the
    interval reflects only how differently the two models rank false claims against their corrections.
    """
    return _difference(_joined(pairs, a, b), a, b, n_boot, seed)


def _difference(joined: pl.DataFrame, a: str, b: str, n_boot: int, seed: int = 0) -> Difference:
    return Difference.of(
        a, b, cluster_estimate(joined["diff"].to_numpy(), joined["claim_id"], n_boot=n_boot, seed=seed)
    )


def seed_pair(pairs: pl.DataFrame, a: str, b: str, margin: float, n_boot: int) -> SeedPair:
    """The paired difference of two seed-only models and its equivalence test against `margin`."""
    joined = _joined(pairs, a, b)
    tost = equivalence(joined["diff"].to_numpy(), joined["claim_id"], margin)
    return SeedPair(_difference(joined, a, b, n_boot), tost.ci_low, tost.ci_high, tost.p_value, tost.equivalent)


def judge(
    models: list[DoseModel], pairs: pl.DataFrame, cfg: ValidateConfig
) -> tuple[list[Difference], list[Difference], dict[str, float], list[SeedPair], bool]:
    """(every dose - dose 0 and each step between neighbouring doses, both over claims and seeds; per-dose
    detection rate across the seeds; the dose-0 seed pairs; monotonic within noise)."""
    labels = [m.label for m in models]
    table = pairs.sort("pair_id")
    wide = np.stack([table.filter(pl.col("model") == label)["score"].to_numpy() for label in labels])
    claims = table.filter(pl.col("model") == labels[0])["claim_id"].to_list()
    boot = series_bootstrap(wide, claims, [m.dose for m in models], n_boot=cfg.bootstrap)
    doses = [float(d) for d in boot.doses]
    name = {d: f"dose={d:g}" for d in doses}
    n_pairs = int(wide.shape[1])

    def contrast(i: int, below: int) -> Difference:  # dose i - dose `below`, over claims and seeds
        estimate = Difference.of(name[doses[below]], name[doses[i]], boot.versus(i, below))
        return dataclasses.replace(estimate, n_pairs=n_pairs)

    vs_zero = [contrast(i, 0) for i in range(1, len(doses))]
    steps = [contrast(i, i - 1) for i in range(1, len(doses))]
    detection = {}
    for d in doses[1:]:
        alone = [
            paired_difference(pairs, model_label(0.0, m.seed), m.label, cfg.bootstrap).ci_low > 0.0
            for m in models
            if m.dose == d
        ]
        detection[f"{d:g}"] = float(np.mean(alone))
    zero = [m for m in models if m.dose == 0.0]
    seed_pairs = [
        seed_pair(pairs, a.label, b.label, cfg.equivalence_margin, cfg.bootstrap)
        for i, a in enumerate(zero)
        for b in zero[i + 1 :]
    ]
    # "Non-decreasing within noise": no step down whose whole interval lies below zero.
    monotonic = all(s.ci_high >= 0.0 for s in steps)
    return vs_zero, steps, detection, seed_pairs, monotonic


def verdict_lines(
    detected: Difference,
    steps: list[Difference],
    seed_pairs: list[SeedPair],
    monotonic: bool,
    dose: float,
    margin: float,
    detection: dict[str, float] | None = None,
) -> tuple[bool, bool, list[str]]:
    """(positive passed, negative passed, one line per finding) from the paired differences."""
    span = f"0% -> {dose_label(dose)}: {detected.mean:+.3f}, 95% CI [{detected.ci_low:+.3f}, {detected.ci_high:+.3f}]"
    rates = (
        "; detected by single seeds at " + ", ".join(f"{dose_label(float(d))} {r:.0%}" for d, r in detection.items())
        if detection
        else ""
    )
    positive = detected.ci_low > 0.0 and monotonic
    lines = []
    if positive:
        lines.append(f"positive control passed: the planted effect is detected at {dose_label(dose)} ({span}){rates}")
    else:
        why = []
        if detected.ci_low <= 0.0:
            why.append(f"the planted effect is not detected at {dose_label(dose)} ({span})")
        for s in steps:
            if s.ci_high < 0.0:
                why.append(
                    f"the score falls from {s.a} to {s.b} ({s.mean:+.3f}, 95% CI [{s.ci_low:+.3f}, {s.ci_high:+.3f}])"
                )
        lines.append(
            "positive control FAILED: " + "; ".join(why) + f"{rates}. Try: more fine-tuning iterations "
            "(--max-iters) or a higher --learning-rate, a larger model, more seeds, or a longer pre-trained base "
            "(--pretrain-iters)"
        )
    false_pos = sum(not p.difference.includes_zero for p in seed_pairs)
    worst = max(seed_pairs, key=lambda p: abs(p.difference.mean))
    negative = all(p.equivalent for p in seed_pairs)
    summary = (
        f"{sum(p.equivalent for p in seed_pairs)} of {len(seed_pairs)} seed pairs equivalent within +-{margin:g} "
        f"(two one-sided tests, largest p {max(p.tost_p for p in seed_pairs):.3g}); false-positive rate "
        f"{false_pos}/{len(seed_pairs)}; largest difference {worst.difference.mean:+.3f} "
        f"({worst.difference.a} vs {worst.difference.b})"
    )
    if negative:
        lines.append(f"negative control passed: {summary}")
    else:
        lines.append(
            f"negative control FAILED: {summary}: runs that differ only in their seed are not shown to agree, so "
            "differences between models of this size may be training noise. Try: more iterations or a lower "
            "--learning-rate (runs that have settled vary less), more claims, or a margin that the study can "
            "afford (--equivalence-margin, declared before the run)"
        )
    return positive, negative, lines


# --------------------------------------------------------------------------------------------------- stages
def _finetune_config(
    cfg: ValidateConfig, data_dir: Path, out_dir: Path, init_from: str, seed: int, max_iters: int, learning_rate: float
) -> Any:
    return FinetuneConfig(
        data_dir=str(data_dir),
        out_dir=str(out_dir),
        init_from=init_from,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        block_size=cfg.block_size,
        dropout=cfg.dropout,
        batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=learning_rate,
        max_iters=max_iters,
        warmup_iters=min(cfg.warmup_iters, max_iters),
        decay_lr=cfg.decay_lr,
        min_lr=min(cfg.min_lr, learning_rate),
        eval_interval=cfg.eval_interval,
        eval_iters=cfg.eval_iters,
        log_interval=max(1, max_iters // 20),
        always_save_checkpoint=cfg.always_save_checkpoint,
        gradient_checkpointing=cfg.gradient_checkpointing,
        device=cfg.device,
        dtype=cfg.dtype,
        seed=seed,
    )


def _prepare_doses(cfg: ValidateConfig, base: Path, planted: Path, out: Path) -> dict[float, tuple[Path, float]]:
    """One prepared mixture per dose: {dose: (data folder, realised planted share of the train tokens)}."""
    prepared = {}
    for dose in sorted(cfg.doses):
        folder = out / "data" / f"dose-{dose:g}"
        sources = [
            {"name": BASE, "path": str(base), "channel_ids": cfg.base_channel_ids, "fraction": 1.0 - dose},
            {"name": PLANTED, "path": str(planted), "channel_ids": cfg.planted_channel_ids, "fraction": dose},
        ]
        meta = prepare(
            PrepareConfig(
                out=str(folder),
                force=True,
                name=f"{cfg.name}-dose-{dose:g}",
                sources=sources,
                seed=cfg.seed,
                tokenizer=tokenizer_spec(cfg.init_from),
            )
        )
        prepared[dose] = (folder, float(meta.mixture.get(PLANTED, 0.0)))
    return prepared


def _train_models(cfg: ValidateConfig, prepared: dict[float, tuple[Path, float]], out: Path) -> list[DoseModel]:
    """The shared base (scratch only), then one fine-tune per dose and seed."""
    tags = {tracking.TAG_STUDY: cfg.name}
    start, lr = cfg.init_from, cfg.learning_rate
    if cfg.init_from == "scratch" and cfg.pretrain_iters > 0:
        log.info("validate: pre-training the shared base for %d iterations", cfg.pretrain_iters)
        base_cfg = _finetune_config(
            cfg,
            prepared[0.0][0],
            out / "models" / "base",
            "scratch",
            cfg.seed,
            cfg.pretrain_iters,
            cfg.pretrain_learning_rate,
        )
        base_cfg = dataclasses.replace(base_cfg, always_save_checkpoint=True)
        result = finetune(base_cfg, nested=True, run_name=f"{cfg.name}: base", tags=tags)
        start = str(result.checkpoint_dir)
    runs = [(d, seed, model_label(d, seed)) for d in sorted(cfg.doses) for seed in seed_list(cfg)]
    models = []
    for dose, seed, label in runs:
        log.info("validate: fine-tuning %s", label)
        folder, realised = prepared[dose]
        ft = _finetune_config(
            cfg, folder, out / "models" / label.replace(" ", "_").replace("=", "-"), start, seed, cfg.max_iters, lr
        )
        cell_tags = {**tags, tracking.TAG_FRACTION: f"{dose:g}", tracking.TAG_SEED: str(seed)}
        result = finetune(ft, nested=True, run_name=f"{cfg.name}: {label}", tags=cell_tags)
        models.append(
            DoseModel(
                label=label,
                dose=dose,
                realised_dose=realised,
                seed=seed,
                checkpoint=str(result.checkpoint_dir),
                finetune_run_id=result.run_id,
            )
        )
    return models


def _score_models(cfg: ValidateConfig, models: list[DoseModel], claims: Path) -> pl.DataFrame:
    """Score every model on the claim set (a nested score run each); returns the pair table of all models."""
    scfg = ScoreConfig(
        models=[m.checkpoint for m in models],
        claims=str(claims),
        device=cfg.device,
        dtype=cfg.score_dtype,
        batch_size=cfg.score_batch_size,
        bootstrap=cfg.bootstrap,
        dose_source=PLANTED,
    )
    statements = statements_of(cfg, claims)
    device = resolve_device(cfg.device)
    dtype = torch_dtype(resolve_dtype(cfg.score_dtype, device))
    tables = []
    for m in models:
        model = load_for_inference(resolve_model(m.checkpoint), device, dtype)
        # The model column carries the label so pair tables of different models join on it.
        table = score_model(model, m.label, statements, scfg)
        del model
        pairs = pair_table(table)
        summary = summarise(m.label, m.dose, table, pairs, scfg)
        if summary.overall is None:
            raise FakegptError(f"--claims {claims}: no claim/correction pairs to score")
        g = summary.overall
        m.score, m.ci_low, m.ci_high, m.win_rate = g.mean, g.ci_low, g.ci_high, g.win_rate
        tags = {tracking.TAG_MODEL: m.checkpoint, tracking.TAG_FRACTION: f"{m.dose:g}", tracking.TAG_STUDY: cfg.name}
        with tracking.run(stage="score", run_name=f"{cfg.name}: score {m.label}", tags=tags, nested=True) as child:
            tracking.log_metrics(metrics_of(summary))
            m.score_run_id = child.info.run_id
        log.info("validate: %s: claim score %+.4f [%+.4f, %+.4f]", m.label, g.mean, g.ci_low, g.ci_high)
        tables.append(pairs)
    return pl.concat(tables)


# ---------------------------------------------------------------------------------------------------- report
def plot(result: ValidationResult, path: Path, title: str) -> Path:
    """Left: every model's claim score (one marker per seed) against the dose. Right: each dose's paired
    difference from dose 0 over claims and seeds (what the verdict uses), with its 95% interval."""
    seeds = sorted({m.seed for m in result.models})
    with figure(path, figsize=(11, 4), dpi=110, ncols=2) as (fig, (left, right)):
        for seed in seeds:
            ms = sorted((m for m in result.models if m.seed == seed), key=lambda m: m.dose)
            left.errorbar(
                [m.dose * 100 for m in ms],
                [m.score for m in ms],
                yerr=[[m.score - m.ci_low for m in ms], [m.ci_high - m.score for m in ms]],
                fmt="o-",
                capsize=3,
                alpha=0.8,
                label=f"seed {seed}",
            )
        ds = result.vs_zero
        doses = [float(d.b.split("=")[1]) * 100 for d in ds]
        right.errorbar(
            doses,
            [d.mean for d in ds],
            yerr=[[d.mean - d.ci_low for d in ds], [d.ci_high - d.mean for d in ds]],
            fmt="s",
            capsize=3,
            label=f"{len(seeds)} seeds x claims",
        )
        left.set_ylabel("claim score: log p(false) - log p(true)")
        right.set_ylabel("paired difference to dose 0 (claims and seeds)")
        for ax in (left, right):
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_xlabel("planted share of the training tokens (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
    return path


def report_markdown(result: ValidationResult) -> str:
    """The validation report (validation.md): the verdict, the paired differences, then every model."""
    diffs = [
        "| paired difference (b - a), claims and seeds | mean | 95% CI | p | detected by single seeds |",
        "|---|---:|---|---:|---:|",
    ]
    for d in result.vs_zero:
        rate = result.detection.get(d.b.split("=")[1], math.nan)
        diffs.append(
            f"| {d.b} - {d.a} | {d.mean:+.4f} | [{d.ci_low:+.4f}, {d.ci_high:+.4f}] | {d.p_value:.3g} | {rate:.0%} |"
        )
    for d in result.steps:
        diffs.append(
            f"| {d.b} - {d.a} (step) | {d.mean:+.4f} | [{d.ci_low:+.4f}, {d.ci_high:+.4f}] | {d.p_value:.3g} | |"
        )
    seeds = [
        "",
        "| negative control: seed pair at dose 0 | difference | 95% CI | 90% CI (TOST) | TOST p | equivalent |",
        "|---|---:|---|---|---:|---|",
    ]
    for p in result.seed_pairs:
        d = p.difference
        seeds.append(
            f"| {d.b} - {d.a} | {d.mean:+.4f} | [{d.ci_low:+.4f}, {d.ci_high:+.4f}] | "
            f"[{p.tost_low:+.4f}, {p.tost_high:+.4f}] | {p.tost_p:.3g} | {'yes' if p.equivalent else 'no'} |"
        )
    rows = [
        "",
        "| model | planted share (target / realised) | claim score | 95% CI | false-claim wins |",
        "|---|---|---:|---|---:|",
    ]
    for m in result.models:
        rows.append(
            f"| {m.label} | {dose_label(m.dose)} / {m.realised_dose:.2%} | {m.score:+.4f} | "
            f"[{m.ci_low:+.4f}, {m.ci_high:+.4f}] | {m.win_rate:.0%} |"
        )
    mono = f"monotonic within noise: {'yes' if result.monotonic else 'no'}"
    fpr = f"false-positive rate over the seed pairs: {result.false_positive_rate:.0%}"
    return "\n".join([*result.verdict, "", *diffs, *seeds, "", mono, fpr, *rows]) + "\n"


def _log(result: ValidationResult, pairs: pl.DataFrame, out: Path, title: str) -> None:
    first = min(m.seed for m in result.models)
    for m in result.models:
        if m.seed == first:  # the UI charts metrics against step = percent dose
            tracking.log_metrics(
                {
                    tracking.M_VALIDATE_SCORE: m.score,
                    tracking.M_VALIDATE_SCORE_LOW: m.ci_low,
                    tracking.M_VALIDATE_SCORE_HIGH: m.ci_high,
                },
                step=round(m.dose * 100),
            )
    for dose, rate in result.detection.items():
        tracking.log_metrics({tracking.M_VALIDATE_DETECTION: rate}, step=round(float(dose) * 100))
    e, s, d = result.effect, result.seed_diff, result.detected
    assert d is not None  # a validation that ran always has it (None only as the dataclass's default)
    tracking.log_metrics(
        {
            tracking.M_VALIDATE_EFFECT: e.mean,
            tracking.M_VALIDATE_EFFECT_LOW: e.ci_low,
            tracking.M_VALIDATE_EFFECT_HIGH: e.ci_high,
            tracking.M_VALIDATE_DETECTED: d.mean,
            tracking.M_VALIDATE_DETECTED_LOW: d.ci_low,
            tracking.M_VALIDATE_DETECTED_HIGH: d.ci_high,
            tracking.M_VALIDATE_SEED_DIFF: s.mean,
            tracking.M_VALIDATE_SEED_DIFF_LOW: s.ci_low,
            tracking.M_VALIDATE_SEED_DIFF_HIGH: s.ci_high,
            tracking.M_VALIDATE_FALSE_POSITIVE: result.false_positive_rate,
            tracking.M_VALIDATE_TOST_P: max(p.tost_p for p in result.seed_pairs),
            tracking.M_VALIDATE_MONOTONIC: float(result.monotonic),
            tracking.M_VALIDATE_POSITIVE: float(result.positive_passed),
            tracking.M_VALIDATE_NEGATIVE: float(result.negative_passed),
        }
    )
    tracking.set_tags({tracking.TAG_VERDICT: "passed" if result.passed else "failed"})
    with atomic_path(out / "pairs.csv", suffix=".csv") as tmp:
        pairs.drop(pl.col(pl.List(pl.Int64)), pl.col(pl.List(pl.Float64)), strict=False).write_csv(tmp)
    write_json(
        out / "validation.json",
        {
            "models": [dataclasses.asdict(m) for m in result.models],
            "effect": dataclasses.asdict(e),
            "detected": dataclasses.asdict(d),
            "steps": [dataclasses.asdict(x) for x in result.steps],
            "seed_diff": dataclasses.asdict(s),
            "seed_pairs": [dataclasses.asdict(p) for p in result.seed_pairs],
            "false_positive_rate": result.false_positive_rate,
            "detection_rate": result.detection,
            "vs_zero": [dataclasses.asdict(x) for x in result.vs_zero],
            "monotonic": result.monotonic,
            "positive_passed": result.positive_passed,
            "negative_passed": result.negative_passed,
            "verdict": result.verdict,
        },
    )
    write_text(out / "validation.md", report_markdown(result))
    plot(result, out / "dose_response.png", title)
    for name in ("validation.json", "validation.md", "dose_response.png", "pairs.csv"):
        tracking.log_artifact(out / name)


def validate(cfg: ValidateConfig) -> ValidationResult:
    """Run the planted-dose experiment and both controls; everything on one parent MLflow run."""
    base, planted, claims = check(cfg)
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise FakegptError(f"--out-dir {out}: exists and is not a folder")
    with _removed_on_failure(out):
        return _validate(cfg, base, planted, claims, out)


@contextlib.contextmanager
def _removed_on_failure(out: Path) -> Iterator[None]:
    """A failed run into a folder it created removes that folder (an existing one is left as it is)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _validate(cfg: ValidateConfig, base: Path, planted: Path, claims: Path, out: Path) -> ValidationResult:
    tags = {tracking.TAG_STUDY: cfg.name, tracking.TAG_MODEL: cfg.init_from}
    with tracking.run(stage="validate", run_name=f"validate: {cfg.name}", tags=tags) as parent:
        tracking.log_params(config.to_dict(cfg))
        tracking.log_artifact(planted, "planted")
        prepared = _prepare_doses(cfg, base, planted, out)
        models = _train_models(cfg, prepared, out)
        pairs = _score_models(cfg, models, claims)
        vs_zero, steps, detection, seed_pairs, monotonic = judge(models, pairs, cfg)
        detected = next(d for d in vs_zero if d.b == f"dose={cfg.detect_dose:g}")
        positive, negative, lines = verdict_lines(
            detected, steps, seed_pairs, monotonic, cfg.detect_dose, cfg.equivalence_margin, detection
        )
        result = ValidationResult(
            models=models,
            effect=vs_zero[-1],
            steps=steps,
            seed_diff=seed_pairs[0].difference,
            monotonic=monotonic,
            positive_passed=positive,
            negative_passed=negative,
            verdict=lines,
            out_dir=out,
            run_id=parent.info.run_id,
            vs_zero=vs_zero,
            detection=detection,
            seed_pairs=seed_pairs,
            false_positive_rate=float(np.mean([not p.difference.includes_zero for p in seed_pairs])),
            detected=detected,
        )
        _log(result, pairs, out, f"{cfg.name} ({cfg.init_from}): {'passed' if result.passed else 'FAILED'}")
    return result


def main(argv: list[str]) -> int:
    """`fakegpt validate [flags]`; returns the exit status."""
    cfg = config.parse(ValidateConfig, argv, prog="fakegpt validate", description=__doc__.splitlines()[0])
    result = validate(cfg)
    print(report_markdown(result), end="")
    print(f"-> {result.out_dir}/validation.md, validation.json, dose_response.png; MLflow run {result.run_id}")
    if not result.passed:
        print("fakegpt validate: a control failed (exit status 1)")
    return 0 if result.passed else 1
