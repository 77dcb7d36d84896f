"""What other code attaches to a fine-tune: a small list of hooks the training loop calls on rank 0.

The loop knows only this interface; what watches it (the claim probe, tune's pruning) is built elsewhere:

- `on_step(Moment)`: at the top of every iteration, before its optimizer step, and once more at the last
  iteration (where no step follows). It returns True when it did work that tokens/s must not count.
- `on_eval(EvalResult)`: after every evaluation, once its metrics are logged. An exception it raises stops
  training on every rank; `finetune` ends the MLflow run as KILLED and re-raises it (tune's pruning raises
  optuna.TrialPruned this way).
- `on_end(Moment)`: after the last iteration, inside the MLflow run, before the final artifacts are logged.

`from_config` gives the hooks a configuration asks for itself: `--claims` scores the claim set while training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fakegpt.finetune.config import FinetuneConfig
from fakegpt.measure import claim_probe
from fakegpt.models.architecture import context_length


@dataclass
class EvalResult:
    """One evaluation, as `on_eval` hooks (tune's pruning) see it."""

    iter: int
    tokens_seen: int
    train_loss: float  # train split, fixed windows (nanoGPT's estimate_loss)
    val_loss: float  # validation split, fixed windows: comparable across runs on the same data folder
    lr: float


@dataclass(frozen=True)
class Moment:
    """Where the run stands, as `on_step` and `on_end` hooks see it."""

    iter: int
    tokens_seen: int
    evaluated: bool  # an evaluation ran at this iteration
    last: bool  # the last iteration (max_iters): no optimizer step follows
    model: Any  # the model being trained, as the user knows it (no loss module, DDP or torch.compile around it)
    log: Callable[[dict[str, float]], None]  # metrics at this iteration, to MLflow and OUT/metrics.jsonl


@dataclass(frozen=True)
class Hooks:
    """Callbacks for the loop; any of them may be left out."""

    on_step: Callable[[Moment], bool | None] | None = None
    on_eval: Callable[[EvalResult], None] | None = None
    on_end: Callable[[Moment], None] | None = None
    # on_eval reads (or deletes) the evaluation's best model: the loop waits for its background write first
    reads_checkpoint: bool = False


def from_config(cfg: FinetuneConfig, model: Any, tokenizer: str | None) -> list[Hooks]:
    """The hooks `cfg` asks for: `--claims` scored every `--claim-eval-interval` iterations (or evaluation).

    Built before training so that a claim too long for the model's context fails before any step."""
    if not cfg.claims:
        return []
    curve = claim_probe.training_curve(
        cfg.claims,
        cfg.claim_eval_interval,
        batch_size=max(1, cfg.batch_size * 4),
        tokenizer=tokenizer,
        n_positions=context_length(model.config, cfg.block_size),
    )
    return [Hooks(on_step=curve.on_step, on_end=curve.on_end)]


def on_steps(hooks: Sequence[Hooks], moment: Moment) -> bool:
    """Every hook's `on_step`; True when any of them did work that tokens/s must not count."""
    busy = [bool(h.on_step(moment)) for h in hooks if h.on_step is not None]
    return any(busy)


def on_evals(hooks: Sequence[Hooks], result: EvalResult, wait_for_checkpoint: Callable[[], None]) -> None:
    """Every hook's `on_eval`, in order; the first exception stops the others and propagates."""
    for h in hooks:
        if h.on_eval is None:
            continue
        if h.reads_checkpoint:
            wait_for_checkpoint()
        h.on_eval(result)


def on_ends(hooks: Sequence[Hooks], moment: Moment) -> None:
    for h in hooks:
        if h.on_end is not None:
            h.on_end(moment)
