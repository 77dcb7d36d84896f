"""Claim scores of a model while it trains: the absorption curve, step by step, at little cost.

`finetune --claims FILE --claim-eval-interval N` calls a `ClaimProbe` every N iterations on the model being
trained, through a `TrainingCurve` attached to the training loop as one of its hooks (`fakegpt.finetune.hooks`).
The probe tokenises the claim set once, scores every statement in batches without gradients, and computes
exactly what `fakegpt score` computes (the same functions: pair table, MC1/MC2, claim-cluster intervals), so the
curve's last point equals a separate `score` run on the checkpoint of that iteration.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fakegpt import tracking
from fakegpt.errors import FakegptError
from fakegpt.measure.generate import token_logprobs
from fakegpt.measure.prompts import load_claims, resolve_path
from fakegpt.measure.score import (
    ScoreConfig,
    encode,
    metrics_of,
    pair_table,
    statement_table,
    summarise,
    with_logprobs,
)
from fakegpt.models.codec import Codec, codec_for


class ClaimProbe:
    """Score one claim set on a model, repeatedly; returns the `score` stage's MLflow metrics each time."""

    def __init__(
        self,
        claims: str | Path,
        batch_size: int = 16,
        bootstrap: int = ScoreConfig.bootstrap,
        seed: int = 0,
        codec: Codec | None = None,
    ):
        statements = load_claims(resolve_path(claims))
        if not any(s.pair_id for s in statements):
            raise ValueError(f"{claims}: no claim pairs to score")
        self.codec = codec or Codec()  # the model's tokenizer (default GPT-2's)
        self.sequences = encode(statements, self.codec)  # tokenised once
        self.table = statement_table("training", statements)
        self.cfg = ScoreConfig(batch_size=batch_size, bootstrap=bootstrap, seed=seed)
        self.claims = str(claims)
        self.longest = max(len(s) for s in self.sequences)  # tokens, <eot> context included

    def check_context(self, n_positions: int) -> None:
        """Every statement must fit the model's context (a scratch model's is its block size)."""
        if self.longest > n_positions:
            raise FakegptError(
                f"--claims {self.claims}: a statement is {self.longest} tokens, longer than the model's context "
                f"({n_positions} positions); use a larger --block-size for a scratch model, or shorter claims"
            )

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        """The claim metrics of `model` now (claim/score, its interval, per topic, MC1/MC2); its mode is kept."""
        was_training = model.training
        model.eval()  # no dropout while measuring
        try:
            logps = token_logprobs(model, self.sequences, batch_size=self.cfg.batch_size)
        finally:
            model.train(was_training)
        table = with_logprobs(self.table, self.sequences, [lp.numpy() for lp in logps], self.codec)
        return metrics_of(summarise("training", None, table, pair_table(table), self.cfg))


class TrainingCurve:
    """The claim scores along a fine-tune: every `interval` iterations and at the last one, or after every
    evaluation when `interval` is 0. Logged with step = iteration (and tokens seen); the time spent scoring is
    logged at the end, for its share of the run."""

    def __init__(self, probe: ClaimProbe, interval: int):
        self.probe = probe
        self.interval = interval
        self.last_iter = -1
        self.seconds = 0.0

    def on_step(self, moment: Any) -> bool:
        """Score when due; True when it scored (time that tokens/s must not count)."""
        if self.interval:
            due = moment.iter != self.last_iter and (moment.iter % self.interval == 0 or moment.last)
        else:
            due = moment.evaluated
        if not due:
            return False
        started = time.perf_counter()
        scores = self.probe(moment.model)
        self.seconds += time.perf_counter() - started
        self.last_iter = moment.iter
        moment.log({**scores, tracking.M_TOKENS_SEEN: moment.tokens_seen})
        return True

    def on_end(self, moment: Any) -> None:
        tracking.log_metrics({tracking.M_CLAIM_EVAL_SECONDS: self.seconds})


def training_curve(
    claims: str | Path, interval: int, batch_size: int, tokenizer: str | None, n_positions: int
) -> TrainingCurve:
    """The curve of `claims` for a model with the tokenizer in folder `tokenizer` (None: GPT-2's) and
    `n_positions` of context; a statement too long for that context is an error now, before training."""
    codec = codec_for(tokenizer) if tokenizer else None  # the claims in the model's own tokens
    probe = ClaimProbe(claims, batch_size=batch_size, codec=codec)
    probe.check_context(n_positions)
    return TrainingCurve(probe, interval)
