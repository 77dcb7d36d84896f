"""`fakegpt finetune`: continue training a GPT-2 (transformers' GPT2LMHeadModel) on prepared token bins.

Reads DIR/train.bin + DIR/val.bin (uint16 GPT-2 ids) and DIR/meta.json written by `fakegpt prepare`, trains
with AdamW and gradient accumulation, evaluates on fixed validation windows every `eval_interval` iterations
(and at the last one), keeps the best model as an HF-format folder OUT/checkpoint/ plus OUT/train_state.pt for
`init_from=resume`, and logs everything to MLflow. Under `torchrun --nproc_per_node=N` it trains data-parallel
(DDP): the accumulation steps are split across ranks, gradients are synchronised on the last micro-step only,
and only rank 0 logs and saves.

Configuration field names are nanoGPT's. The defaults reproduce the original study's fine-tune (nanoGPT's
finetune_shakespeare settings): micro-batch 1 x 32 accumulation steps x block 1024 = 32,768 tokens per
iteration, constant learning rate 3e-5, evaluation every 5 iterations over 40 batches, save on improvement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fakegpt import config as config_mod
from fakegpt import plots, tracking
from fakegpt.data.bins import eval_starts, open_bin
from fakegpt.data.meta import DatasetMeta
from fakegpt.errors import FakegptError, one_line
from fakegpt.files import atomic_path
from fakegpt.finetune import distributed
from fakegpt.finetune.batches import Batches
from fakegpt.finetune.checks import STATE_FILE, check
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.loss import causal_lm_loss
from fakegpt.finetune.mfu import flops_per_token, peak_flops
from fakegpt.models.checkpoint import CHECKPOINT_DIR, TrainingInfo
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.loading import dropout_overrides, load_model, save_checkpoint, scratch_model, use_fused_gelu

log = logging.getLogger(__name__)

CURVE_FILE = "loss_curve.png"


@dataclass
class EvalResult:
    iter: int
    tokens_seen: int
    train_loss: float  # train split, fixed windows (nanoGPT's estimate_loss)
    val_loss: float  # validation split, fixed windows: comparable across runs on the same data folder
    lr: float


@dataclass
class FinetuneResult:
    best_val_loss: float
    best_iter: int
    iters_done: int
    tokens_seen: int
    out_dir: Path
    checkpoint_dir: Path
    run_id: str | None
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens_seen, val_loss)


class NonFiniteLossError(FakegptError):
    """A NaN or inf loss: training stops, the last good checkpoint stays on disk."""


# --- configuration resolution and checks (all before any model is loaded) ---------------------------------


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


# --- the training loop ---------------------------------------------------------------------------------------


class _Objective(torch.nn.Module):
    """Wraps the HF model so that DDP (and torch.compile) see a module whose forward returns the loss."""

    def __init__(self, model: torch.nn.Module, fused: bool):
        super().__init__()
        self.model = model
        self.fused = fused

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.model, x, y, fused=self.fused)


class _Stop(Exception):
    """Raised on ranks > 0 when rank 0 stops training (its callback raised or the loss was not finite)."""


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    # Weight decay on matrices only (nanoGPT): biases and LayerNorm gains are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel over all parameters, on CUDA and (torch >= 2.4) on the CPU, where it is several times
    # faster than the default multi-tensor loop (tools/bench_train.py).
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def _load(cfg: FinetuneConfig, folder: str, device: torch.device) -> torch.nn.Module:
    if cfg.init_from == "scratch":
        torch.manual_seed(cfg.seed)
        model = scratch_model(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout)
    else:
        model = load_model(folder, dtype=torch.float32, **dropout_overrides(cfg.dropout))
    use_fused_gelu(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.to(device)


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
    return loss_sum.item()  # one host sync per step


def update(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, grad_clip: float
) -> None:
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _estimate(
    objective: torch.nn.Module, batches: Batches, starts: Any, info: distributed.Dist, autocast: Any
) -> float:
    """Mean loss over fixed windows; each rank takes every world_size-th micro-batch, sums are all-reduced."""
    objective.eval()
    total, count = 0.0, 0
    b = batches.batch_size
    chunks = [starts[i : i + b] for i in range(0, len(starts), b)]
    for chunk in chunks[info.rank :: info.world_size]:
        x, y = batches.windows(chunk)
        with autocast:
            total += objective(x, y).item() * len(chunk)
        count += len(chunk)
    objective.train()
    total, count = distributed.all_sum([total, float(count)], batches.device)
    return total / count


def finetune(
    cfg: FinetuneConfig,
    on_eval: Callable[[EvalResult], None] | None = None,
    *,
    nested: bool = False,
    run_name: str | None = None,
    tags: dict | None = None,
) -> FinetuneResult:
    """Fine-tune per `cfg`; returns the best validation loss and where the best checkpoint is.

    `on_eval` runs on rank 0 after every evaluation (after the checkpoint for it is saved); any exception it
    raises stops training, ends the MLflow run as KILLED and is re-raised. With `nested`, the run is a child
    of the active MLflow run.
    """
    info = distributed.from_env()
    device = distributed.local_device(info, resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device, training=True)
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    if tracking.is_artifact_uri(cfg.data_dir):  # runs:/<prepare run>/data, as the pipeline passes it
        tags = {**(tags or {}), tracking.TAG_DATA_URI: cfg.data_dir}
        cfg = dataclasses.replace(cfg, data_dir=str(tracking.local_path(cfg.data_dir)))
    folder, meta = check(cfg, info.world_size)
    resolved = dataclasses.replace(cfg, device=str(device), dtype=dtype, compile=use_compile)
    distributed.setup(info, device)
    try:
        return _train(resolved, folder, meta, info, device, on_eval, nested, run_name, tags)
    finally:
        distributed.teardown()


def _train(
    cfg: FinetuneConfig,
    folder: str,
    meta: DatasetMeta,
    info: distributed.Dist,
    device: torch.device,
    on_eval: Callable[[EvalResult], None] | None,
    nested: bool,
    run_name: str | None,
    tags: dict | None,
) -> FinetuneResult:
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    state: dict[str, Any] = {}
    if cfg.init_from == "resume":
        state = torch.load(out_dir / STATE_FILE, map_location="cpu", weights_only=True)
    init_from = state.get("init_from", cfg.init_from)

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = _load(cfg, folder, device)
    model.train()
    optimizer = _optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    if state:
        optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    # The fused output layer + loss is for eager fp32 (the CPU); under autocast or torch.compile the plain
    # logits + cross-entropy path is used (inductor fuses it by itself).
    objective: torch.nn.Module = _Objective(model, fused=not cfg.compile and cfg.dtype == "float32")
    if cfg.compile:
        objective = torch.compile(objective)
    if info.world_size > 1:
        # No buffer broadcast: GPT-2 has no buffers that change, and evaluation runs on the unwrapped module.
        objective = DDP(
            objective, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    autocast = (
        torch.autocast(device.type, dtype=torch_dtype(cfg.dtype))
        if cfg.dtype != "float32"
        else contextlib.nullcontext()
    )

    train_data, val_data = (open_bin(cfg.data_dir, s, cfg.block_size) for s in ("train", "val"))
    train_batches = Batches(train_data, cfg.batch_size, cfg.block_size, device, seed=cfg.seed)
    val_batches = Batches(val_data, cfg.batch_size, cfg.block_size, device, seed=0)
    n_eval = cfg.eval_iters * cfg.batch_size
    fixed = {
        "train": eval_starts(len(train_data), cfg.block_size, n_eval),
        "val": eval_starts(len(val_data), cfg.block_size, n_eval),
    }
    accum = cfg.gradient_accumulation_steps // info.world_size  # micro-steps per rank
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    flops_token = flops_per_token(model, cfg.block_size)
    peak = peak_flops(device, cfg.dtype) if device.type == "cuda" else None  # MFU against this very card

    it = int(state.get("iter", 0))
    best_val = float(state.get("best_val_loss", math.inf))
    best_iter = int(state.get("best_iter", -1))
    val_curve = [tuple(p) for p in state.get("val_curve", [])]
    train_curve = [tuple(p) for p in state.get("train_curve", [])]
    run_id = state.get("run_id")
    result = FinetuneResult(best_val, best_iter, it, it * tokens_per_iter, out_dir, ckpt_dir, run_id, val_curve)

    stop_exc: list[BaseException] = []  # the exception on_eval raised, if any (a deliberate stop)
    run_ctx = (
        _mlflow_run(cfg, init_from, meta, state, nested, run_name, tags, stop_exc)
        if info.main
        else contextlib.nullcontext(None)
    )
    with run_ctx as active:
        if active is not None:
            result.run_id = run_id = active.info.run_id

        def save(val_loss: float) -> None:
            training_info = TrainingInfo(
                init_from=init_from,
                config=config_mod.to_dict(cfg),
                data=meta.to_dict(),
                iter=it,
                val_loss=val_loss,
                tokens_seen=it * tokens_per_iter,
            )
            save_checkpoint(model, ckpt_dir, training_info)
            train_state = {
                "iter": it,
                "best_val_loss": best_val,
                "best_iter": best_iter,
                "init_from": init_from,
                "run_id": run_id or "",
                "config": json.dumps(config_mod.to_dict(cfg)),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "val_curve": [list(p) for p in val_curve],
                "train_curve": [list(p) for p in train_curve],
                # Batches and dropout are re-seeded from (seed, rank, iteration) every iteration, so the
                # iteration number is the whole RNG state: a resumed run draws the same batches.
                "seed": cfg.seed,
            }
            with atomic_path(out_dir / STATE_FILE) as tmp:
                torch.save(train_state, tmp)

        bar = tqdm(total=cfg.max_iters, initial=it, desc="finetune", unit="it", disable=None if info.main else True)
        t_last = time.perf_counter()
        while True:
            lr = lr_at(cfg, it)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if it % cfg.eval_interval == 0 or it == cfg.max_iters:
                plain = getattr(objective, "module", objective)  # no DDP hooks in evaluation
                train_loss = _estimate(plain, train_batches, fixed["train"], info, autocast)
                val_loss = _estimate(plain, val_batches, fixed["val"], info, autocast)
                if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
                    raise NonFiniteLossError(_nonfinite_message("evaluation", it, val_loss, best_iter, ckpt_dir))
                val_curve.append((it * tokens_per_iter, val_loss))
                if info.main:
                    metrics = {
                        tracking.M_VAL_LOSS: val_loss,
                        tracking.M_EVAL_TRAIN_LOSS: train_loss,
                        tracking.M_TOKENS_SEEN: it * tokens_per_iter,
                    }
                    if val_loss < best_val or cfg.always_save_checkpoint:
                        if val_loss < best_val:
                            best_val, best_iter = val_loss, it
                        save(val_loss)
                        metrics[tracking.M_BEST_VAL_LOSS] = best_val
                    if device.type == "cuda":
                        metrics[tracking.M_GPU_MEM] = torch.cuda.max_memory_allocated(device) / 1e9
                    tracking.log_metrics(metrics, step=it)
                    bar.set_postfix(val=f"{val_loss:.4f}", best=f"{best_val:.4f}")
                    if on_eval is not None:
                        try:
                            on_eval(EvalResult(it, it * tokens_per_iter, train_loss, val_loss, lr))
                        except BaseException as exc:  # noqa: B036 - any stop request, re-raised below
                            stop_exc.append(exc)
                result.best_val_loss, result.best_iter = best_val, best_iter
                if distributed.broadcast_flag(bool(stop_exc), device):
                    if stop_exc:
                        raise stop_exc[0]
                    raise _Stop()
                t_last = time.perf_counter()  # tokens/s measures training, not evaluation
            if it >= cfg.max_iters:
                break

            # One optimizer step: `accum` micro-batches on this rank; DDP syncs gradients on the last only.
            seeds = np.random.SeedSequence((cfg.seed, info.rank, it))
            train_batches.rng = np.random.default_rng(seeds)
            torch.manual_seed(int(seeds.generate_state(1)[0]))
            local_loss = accumulate(objective, train_batches, accum, autocast, scaler)
            (step_loss,) = distributed.all_sum([local_loss], device)
            step_loss /= info.world_size
            if not math.isfinite(step_loss):
                optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(_nonfinite_message("training", it, step_loss, best_iter, ckpt_dir))
            update(model, optimizer, scaler, cfg.grad_clip)
            it += 1
            result.iters_done, result.tokens_seen = it, it * tokens_per_iter
            bar.update(1)

            now = time.perf_counter()
            dt, t_last = now - t_last, now
            train_curve.append((it * tokens_per_iter, step_loss))
            if info.main and (it % cfg.log_interval == 0 or it == cfg.max_iters):
                tokens_per_s = tokens_per_iter / dt
                metrics = {
                    tracking.M_TRAIN_LOSS: step_loss,
                    tracking.M_LR: lr,
                    tracking.M_TRAIN_TOKENS_PER_S: tokens_per_s,
                }
                if peak:
                    metrics[tracking.M_MFU] = flops_token * tokens_per_s / (peak * info.world_size)
                tracking.log_metrics(metrics, step=it)
        bar.close()

        if info.main:
            _final_artifacts(out_dir, ckpt_dir, train_curve, val_curve, best_iter)
    return result


def _nonfinite_message(where: str, it: int, value: float, best_iter: int, ckpt_dir: Path) -> str:
    kept = (
        f"the last good checkpoint (iteration {best_iter}) is kept in {ckpt_dir}"
        if best_iter >= 0
        else "no checkpoint was saved before it"
    )
    return (
        f"non-finite {where} loss ({value}) at iteration {it}; {kept}. Lower --learning-rate, set "
        "--grad-clip, or use --dtype bfloat16/float32 instead of float16"
    )


@contextlib.contextmanager
def _mlflow_run(
    cfg: FinetuneConfig,
    init_from: str,
    meta: DatasetMeta,
    state: dict[str, Any],
    nested: bool,
    run_name: str | None,
    tags: dict | None,
    stop_exc: list[BaseException],
):
    """The MLflow run (rank 0 only): resumed runs continue their own run id when this store has it."""
    run_id = state.get("run_id") or None
    all_tags = {tracking.TAG_MODEL: init_from, tracking.TAG_DATASET: meta.dataset or Path(cfg.data_dir).name}
    mix = meta.mixture_tag()
    if mix:
        all_tags[tracking.TAG_MIX] = mix
    if run_id is not None:
        try:
            tracking.get_run(run_id)
        except Exception:
            log.warning("resume: run %s is not in this MLflow store; starting a new run tagged with it", run_id)
            all_tags[tracking.TAG_RESUMED_FROM] = run_id
            run_id = None
    all_tags.update(tags or {})

    def killed(exc: BaseException) -> bool:
        return bool(stop_exc) and exc is stop_exc[0]

    with tracking.run(
        stage="finetune",
        run_name=run_name,
        tags=all_tags,
        nested=nested,
        run_id=run_id,
        killed=killed,
        system_metrics=True,
    ) as active:
        tracking.log_params(config_mod.to_dict(cfg))
        tracking.log_params(meta.to_dict(), prefix="data.")
        tracking.log_dict(config_mod.to_dict(cfg), "config.yaml")
        try:
            yield active
        except BaseException as exc:
            if stop_exc and exc is stop_exc[0]:
                tracking.set_tags({tracking.TAG_STOP: type(exc).__name__})
            elif isinstance(exc, Exception):
                with contextlib.suppress(Exception):
                    tracking.set_tags({tracking.TAG_ERROR: one_line(exc)})
            raise


def _final_artifacts(out_dir: Path, ckpt_dir: Path, train_curve: list, val_curve: list, best_iter: int) -> None:
    curve = plots.line_plot(
        out_dir / CURVE_FILE,
        {"train": train_curve, "val": val_curve},
        xlabel="tokens seen",
        ylabel="cross-entropy loss",
        title=f"fine-tune (best val at iteration {best_iter})",
        markers=("val",),
    )
    tracking.log_artifact(curve)
    if ckpt_dir.is_dir():
        tracking.log_artifact(ckpt_dir, artifact_path=CHECKPOINT_DIR)


def main(argv: list[str]) -> int:
    cfg = config_mod.parse(
        FinetuneConfig,
        argv,
        prog="fakegpt finetune",
        description="Fine-tune GPT-2 on prepared token bins; tracked in MLflow.",
    )
    result = finetune(cfg)
    if distributed.from_env().main:
        print(
            f"best val/loss {result.best_val_loss:.4f} at iteration {result.best_iter} "
            f"({result.iters_done} iterations, {result.tokens_seen:,} tokens); checkpoint: {result.checkpoint_dir}"
            + (f"; MLflow run {result.run_id}" if result.run_id else "")
        )
    return 0
