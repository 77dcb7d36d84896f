"""`fakegpt validate`: does the claim score measure what it claims to? A positive and a negative control.

    fakegpt validate                                            # tiny scratch model on the CPU, a few minutes
    fakegpt validate --config experiments/validation/gpt2-medium.yaml   # real model on a GPU

Positive control (a planted effect of known size): paraphrases asserting the false side of every claim
(experiments/validation/planted_claims.csv, worded differently from the scored statements) are mixed into a
base corpus with no claim content at several doses (shares of the training tokens) through `prepare`'s
mixtures. The same base model is fine-tuned once per dose; the claim score must rise with the dose: the
paired difference top dose - dose 0, per claim pair and bootstrapped over pairs, must exclude 0, and no step
between neighbouring doses may fall beyond its own 95% interval. Negative control: dose 0 fine-tuned a second
time with another seed must not differ from the first beyond its interval (the paired difference includes 0).

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
from fakegpt.models.refs import load_for_inference, resolve_model
from fakegpt.plots import figure
from fakegpt.stats import cluster_bootstrap_ci

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
        default=1338, metadata={"help": "seed of the second dose-0 fine-tune (the negative control)"}
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

    @property
    def includes_zero(self) -> bool:
        """True when the interval includes zero (no difference beyond noise)."""
        return self.ci_low <= 0.0 <= self.ci_high


@dataclass
class DoseModel:
    """One fine-tuned model of the validation: its planted dose, seed, checkpoint and claim score."""

    label: str  # "dose=0.05" or "dose=0 seed=1338"
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
    effect: Difference  # top dose - dose 0 (same seed)
    steps: list[Difference]  # each dose - the one below it
    seed_diff: Difference  # dose 0, control seed - seed
    monotonic: bool
    positive_passed: bool
    negative_passed: bool
    verdict: list[str]
    out_dir: Path
    run_id: str | None = None
    vs_zero: list[Difference] = field(default_factory=list)  # every other model - dose 0, for the plot

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
def paired_difference(pairs: pl.DataFrame, a: str, b: str, n_boot: int, seed: int = 0) -> Difference:
    """Mean of score_b - score_a over the claim pairs both models were scored on, bootstrapped over claims
    (a pair and its translation resampled together).

    Pairing removes what the pairs share across models (how hard a pair is, its length, its language), so the
    interval reflects only how differently the two models rank false claims against their corrections.
    """
    left = pairs.filter(pl.col("model") == a).select("pair_id", "claim_id", pl.col("score").alias("score_a"))
    right = pairs.filter(pl.col("model") == b).select("pair_id", pl.col("score").alias("score_b"))
    joined = left.join(right, on="pair_id", how="inner")
    diffs = (joined["score_b"] - joined["score_a"]).to_numpy()
    if diffs.size == 0:
        raise FakegptError(f"no claim pairs scored for both {a} and {b}")
    low, high = cluster_bootstrap_ci(diffs, joined["claim_id"], n_boot=n_boot, seed=seed)
    return Difference(a=a, b=b, mean=float(diffs.mean()), ci_low=low, ci_high=high, n_pairs=int(diffs.size))


def judge(
    models: list[DoseModel], pairs: pl.DataFrame, n_boot: int
) -> tuple[Difference, list[Difference], Difference, bool]:
    """(top dose - dose 0, consecutive steps, seed-only difference, monotonic within noise)."""
    doses = sorted((m for m in models if m.label.startswith("dose=") and "seed=" not in m.label), key=lambda m: m.dose)
    control = next(m for m in models if "seed=" in m.label)
    effect = paired_difference(pairs, doses[0].label, doses[-1].label, n_boot)
    steps = [paired_difference(pairs, lo.label, hi.label, n_boot) for lo, hi in zip(doses, doses[1:], strict=False)]
    seed_diff = paired_difference(pairs, doses[0].label, control.label, n_boot)
    # "Non-decreasing within noise": no step down whose whole interval lies below zero.
    monotonic = all(s.ci_high >= 0.0 for s in steps)
    return effect, steps, seed_diff, monotonic


def verdict_lines(
    effect: Difference, steps: list[Difference], seed_diff: Difference, monotonic: bool, top: float
) -> tuple[bool, bool, list[str]]:
    """(positive passed, negative passed, one line per finding) from the paired differences."""
    span = f"0% -> {dose_label(top)}: {effect.mean:+.2f}, 95% CI [{effect.ci_low:+.2f}, {effect.ci_high:+.2f}]"
    positive = effect.ci_low > 0.0 and monotonic
    lines = []
    if positive:
        lines.append(f"positive control passed: the score rises with dose ({span})")
    else:
        why = []
        if effect.ci_low <= 0.0:
            why.append(f"the top dose does not raise the score beyond noise ({span})")
        for s in steps:
            if s.ci_high < 0.0:
                why.append(
                    f"the score falls from {s.a} to {s.b} ({s.mean:+.2f}, 95% CI [{s.ci_low:+.2f}, {s.ci_high:+.2f}])"
                )
        lines.append(
            "positive control FAILED: " + "; ".join(why) + ". Try: more fine-tuning iterations "
            "(--max-iters) or a higher --learning-rate, a higher top dose, a larger model, or a longer "
            "pre-trained base (--pretrain-iters)"
        )
    negative = seed_diff.includes_zero
    diff = f"{seed_diff.mean:+.2f}, 95% CI [{seed_diff.ci_low:+.2f}, {seed_diff.ci_high:+.2f}]"
    if negative:
        lines.append(f"negative control passed: seed-only difference {diff}, CI includes 0")
    else:
        lines.append(
            f"negative control FAILED: seed-only difference {diff} excludes 0: two runs that differ "
            "only in their seed look different, so the intervals over claim pairs understate run-to-run "
            "noise at this configuration. Try: more iterations or a lower --learning-rate (runs that "
            "have settled vary less), or compare models only by differences larger than this one"
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
            PrepareConfig(out=str(folder), force=True, name=f"{cfg.name}-dose-{dose:g}", sources=sources, seed=cfg.seed)
        )
        prepared[dose] = (folder, float(meta.mixture.get(PLANTED, 0.0)))
    return prepared


def _train_models(cfg: ValidateConfig, prepared: dict[float, tuple[Path, float]], out: Path) -> list[DoseModel]:
    """The shared base (scratch only), then one fine-tune per dose plus the dose-0 control seed."""
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
    runs = [(d, cfg.seed, f"dose={d:g}") for d in sorted(cfg.doses)]
    runs.append((0.0, cfg.control_seed, f"dose=0 seed={cfg.control_seed}"))
    models = []
    for dose, seed, label in runs:
        log.info("validate: fine-tuning %s", label)
        folder, realised = prepared[dose]
        ft = _finetune_config(
            cfg, folder, out / "models" / label.replace(" ", "_").replace("=", "-"), start, seed, cfg.max_iters, lr
        )
        result = finetune(
            ft, nested=True, run_name=f"{cfg.name}: {label}", tags={**tags, tracking.TAG_FRACTION: f"{dose:g}"}
        )
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
    """Claim score per dose with its 95% interval; the seed-only control drawn beside dose 0."""
    doses = sorted((m for m in result.models if "seed=" not in m.label), key=lambda m: m.dose)
    control = [m for m in result.models if "seed=" in m.label]
    diffs = {d.b: d for d in result.vs_zero}
    with figure(path, figsize=(11, 4), dpi=110, ncols=2) as (fig, (left, right)):
        for ms, style, label in (
            (doses, "o-", f"seed {doses[0].seed}"),
            (control, "s", f"dose 0, seed {control[0].seed} (negative control)"),
        ):
            xs = [m.dose * 100 for m in ms]
            left.errorbar(
                xs,
                [m.score for m in ms],
                yerr=[[m.score - m.ci_low for m in ms], [m.ci_high - m.score for m in ms]],
                fmt=style,
                capsize=3,
                label=label,
            )
            # Right: the paired difference to dose 0 (what the verdict uses): the spread between pairs cancels.
            ds = [diffs[m.label] for m in ms if m.label in diffs]
            right.errorbar(
                [m.dose * 100 for m in ms if m.label in diffs],
                [d.mean for d in ds],
                yerr=[[d.mean - d.ci_low for d in ds], [d.ci_high - d.mean for d in ds]],
                fmt=style,
                capsize=3,
                label=label,
            )
        left.set_ylabel("claim score: log p(false) - log p(true)")
        right.set_ylabel("paired difference to dose 0 (over claim pairs)")
        for ax in (left, right):
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_xlabel("planted share of the training tokens (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)
    return path


def report_markdown(result: ValidationResult) -> str:
    """The validation report (report.md): models, paired differences and the verdict."""
    rows = [
        "| model | planted share (target / realised) | claim score | 95% CI | false-claim wins |",
        "|---|---|---:|---|---:|",
    ]
    for m in result.models:
        rows.append(
            f"| {m.label} | {dose_label(m.dose)} / {m.realised_dose:.2%} | {m.score:+.4f} | "
            f"[{m.ci_low:+.4f}, {m.ci_high:+.4f}] | {m.win_rate:.0%} |"
        )
    diffs = ["", "| paired difference (b - a, over claim pairs) | mean | 95% CI |", "|---|---:|---|"]
    for d in [result.effect, *result.steps, result.seed_diff]:
        diffs.append(f"| {d.b} - {d.a} | {d.mean:+.4f} | [{d.ci_low:+.4f}, {d.ci_high:+.4f}] |")
    mono = f"monotonic within noise: {'yes' if result.monotonic else 'no'}"
    return "\n".join(rows + diffs + ["", mono, "", *result.verdict]) + "\n"


def _log(result: ValidationResult, pairs: pl.DataFrame, out: Path, title: str) -> None:
    for m in result.models:
        if "seed=" not in m.label:  # the UI charts metrics against step = percent dose
            tracking.log_metrics(
                {
                    tracking.M_VALIDATE_SCORE: m.score,
                    tracking.M_VALIDATE_SCORE_LOW: m.ci_low,
                    tracking.M_VALIDATE_SCORE_HIGH: m.ci_high,
                },
                step=round(m.dose * 100),
            )
    e, s = result.effect, result.seed_diff
    tracking.log_metrics(
        {
            tracking.M_VALIDATE_EFFECT: e.mean,
            tracking.M_VALIDATE_EFFECT_LOW: e.ci_low,
            tracking.M_VALIDATE_EFFECT_HIGH: e.ci_high,
            tracking.M_VALIDATE_SEED_DIFF: s.mean,
            tracking.M_VALIDATE_SEED_DIFF_LOW: s.ci_low,
            tracking.M_VALIDATE_SEED_DIFF_HIGH: s.ci_high,
            tracking.M_VALIDATE_MONOTONIC: float(result.monotonic),
            tracking.M_VALIDATE_POSITIVE: float(result.positive_passed),
            tracking.M_VALIDATE_NEGATIVE: float(result.negative_passed),
        }
    )
    tracking.set_tags({tracking.TAG_VERDICT: "passed" if result.passed else "failed"})
    with atomic_path(out / "pairs.csv", suffix=".csv") as tmp:
        pairs.write_csv(tmp)
    write_json(
        out / "validation.json",
        {
            "models": [dataclasses.asdict(m) for m in result.models],
            "effect": dataclasses.asdict(e),
            "steps": [dataclasses.asdict(d) for d in result.steps],
            "seed_diff": dataclasses.asdict(s),
            "vs_zero": [dataclasses.asdict(d) for d in result.vs_zero],
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
        effect, steps, seed_diff, monotonic = judge(models, pairs, cfg.bootstrap)
        vs_zero = [paired_difference(pairs, models[0].label, m.label, cfg.bootstrap) for m in models[1:]]
        positive, negative, lines = verdict_lines(effect, steps, seed_diff, monotonic, max(cfg.doses))
        result = ValidationResult(
            models=models,
            effect=effect,
            steps=steps,
            seed_diff=seed_diff,
            monotonic=monotonic,
            positive_passed=positive,
            negative_passed=negative,
            verdict=lines,
            out_dir=out,
            run_id=parent.info.run_id,
            vs_zero=vs_zero,
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
