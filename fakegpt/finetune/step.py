"""One optimizer step of a fine-tune, and what it needs: the learning-rate schedule, the loss module DDP and
torch.compile wrap, gradient accumulation, the clipped update, the fixed-window loss estimate.

The loop that calls these (evaluation, saving, the record) is `fakegpt.finetune.train`; `tools/bench_train.py`
times `accumulate` + `update` as the step `fakegpt finetune` runs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from fakegpt.finetune import distributed
from fakegpt.finetune.batches import Batches
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.loss import causal_lm_loss, logits_bypass


def lr_at(cfg: FinetuneConfig, it: int) -> float:
    """Learning rate for iteration `it`: linear warmup, then constant or cosine decay to min_lr (nanoGPT)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    end = cfg.lr_decay_iters if cfg.lr_decay_iters is not None else cfg.max_iters
    if it >= end:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, end - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


class Objective(torch.nn.Module):
    """Wraps the HF model so that DDP (and torch.compile) see a module whose forward returns the loss.
    Whether the architecture needs its own logits (`logits_bypass`) is decided here, before DDP, FSDP or
    torch.compile wrap it, so the traced forward holds no such decision."""

    def __init__(self, model: torch.nn.Module, fused: bool):
        super().__init__()
        self.model = model
        self.fused = fused
        self.own_logits = logits_bypass(model) is not None

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, x, y, fused=self.fused, own_logits=self.own_logits)


def accumulate(
    objective: torch.nn.Module, batches: Batches, accum: int, autocast: Any, scaler: torch.amp.GradScaler
) -> float:
    """Forward + backward over `accum` micro-batches; returns this rank's mean loss. Under DDP the gradients
    are all-reduced only on the last micro-batch (no_sync before), once per optimizer step."""
    loss_sum = None
    for micro in range(accum):
        x, y = batches.next()  # (B, T), (B, T)
        last = micro == accum - 1
        with contextlib.nullcontext() if last or not hasattr(objective, "no_sync") else objective.no_sync():
            with autocast:
                loss = objective(x, y) / accum
            scaler.scale(loss).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    assert loss_sum is not None  # accum >= 1: --gradient-accumulation-steps is checked positive up front
    return loss_sum.item()  # one host sync per step


def update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float
) -> None:
    """Clip (after unscaling), step the optimizer through the scaler, and clear the gradients."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def estimate(
    objective: torch.nn.Module,
    batches: Batches,
    starts: Any,
    info: distributed.Dist,
    autocast: Any,
    lockstep: bool = False,
) -> float:
    """Mean loss over fixed windows; each rank takes every world_size-th micro-batch, sums are all-reduced.
    `lockstep` (FSDP, where a forward gathers weights from all ranks): every rank runs as many forwards; a
    rank with one micro-batch fewer repeats its first, uncounted."""
    objective.eval()
    total, count = 0.0, 0
    b = batches.batch_size
    chunks = [starts[i : i + b] for i in range(0, len(starts), b)]
    mine = chunks[info.rank :: info.world_size]
    for chunk in mine:
        x, y = batches.windows(chunk)
        with autocast:
            total += objective(x, y).item() * len(chunk)
        count += len(chunk)
    for _ in range(-(-len(chunks) // info.world_size) - len(mine) if lockstep else 0):
        with autocast:
            objective(*batches.windows(chunks[0]))
    objective.train()
    summed, windows = distributed.all_sum([total, float(count)], batches.device)
    return summed / windows
