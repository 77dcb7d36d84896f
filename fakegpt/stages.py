"""The one list of stages: the CLI's subcommands and the MLproject's entry points are both read from here.

Each stage is a module with a `main(argv)` and a config dataclass whose fields are its flags and MLproject
parameters. Modules are named as strings so that listing the stages imports none of them (`fakegpt prepare`
must not pay for importing torch).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage: the name users type, its module, its config classes and its MLproject entry point."""

    name: str  # what users type: `fakegpt NAME`
    module: str  # the module with `main(argv)`
    configs: tuple[str, ...]  # "module.Class" of the config dataclasses whose fields are the MLproject params
    description: str
    entry_point: str | None = None  # MLproject entry point name; None: not an entry point (interactive/hand work)


STAGES: tuple[Stage, ...] = (
    Stage(
        "prepare",
        "fakegpt.data.prepare",
        ("fakegpt.data.prepare.PrepareConfig",),
        "Telegram exports (CSV, Desktop JSON, JSON Lines, Parquet) -> cleaned token bins in the model's tokenizer "
        "(train.bin, val.bin, meta.json)",
        "prepare",
    ),
    Stage(
        "finetune",
        "fakegpt.finetune.train",
        ("fakegpt.finetune.config.FinetuneConfig",),
        "fine-tune GPT-2 or any Hugging Face causal LM on prepared token bins (full, LoRA or QLoRA), tracked in MLflow",
        "finetune",
    ),
    Stage(
        "sample",
        "fakegpt.measure.sample",
        ("fakegpt.measure.sample.SampleConfig",),
        "sample a grid of prompts x temperatures x models into tables and a report",
        "sample",
    ),
    Stage(
        "score",
        "fakegpt.measure.score",
        ("fakegpt.measure.score.ScoreConfig",),
        "claim-likelihood scores: log p(false claim) - log p(correction)",
        "score",
    ),
    Stage("labels", "fakegpt.measure.labels", (), "export / import / aggregate human label sheets for samples"),
    Stage("chat", "fakegpt.measure.chat", (), "interactive prompt for one model"),
    Stage(
        "tune",
        "fakegpt.studies.tune",
        ("fakegpt.studies.tune.TuneConfig", "fakegpt.finetune.config.FinetuneConfig"),
        "Optuna study over learning rate and gradient accumulation",
        "tune",
    ),
    Stage(
        "pipeline",
        "fakegpt.studies.main",
        ("fakegpt.studies.main.MainConfig",),
        "the whole chain prepare -> finetune -> sample -> score (MLproject `main`)",
        "main",
    ),
    Stage(
        "mixture",
        "fakegpt.studies.mixture",
        ("fakegpt.studies.mixture.MixtureConfig",),
        "the dose-response series over anti-vaccine fractions",
        "mixture",
    ),
    Stage(
        "validate",
        "fakegpt.studies.validate",
        ("fakegpt.studies.validate.ValidateConfig",),
        "positive/negative controls for the claim score",
        "validate",
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
# MLproject order: `main` first (what `mlflow run .` runs), then the stages in the order a study uses them.
ENTRY_POINTS: tuple[Stage, ...] = tuple(
    sorted((s for s in STAGES if s.entry_point), key=lambda s: s.entry_point != "main")
)
