"""What a fine-tune starts from, in the order `fakegpt.finetune.train` builds it:

1. `resolve`: the configuration as this run uses it (data downloaded from a runs:/ URI, the saved configuration
   of a resumed run, device, dtype, compile), checked against the data and the model's shape. It loads no
   model and runs before any collective, so a bad flag is one line before any GPU work.
2. `build`: one frozen `RunSetup` from it: the model (loaded, or rebuilt from a resume state's shape), its loss
   module (sharded, DDP-wrapped, compiled), optimizer, gradient scaler, batches, fixed evaluation windows,
   the hooks, the best-model writer.
3. `start`: the `Progress` the loop continues from: iteration 0, or the resume state restored into the model
   and optimizer, cross-checked with the best model on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fakegpt import config as config_mod
from fakegpt import tracking
from fakegpt.data.bins import eval_starts, open_bin
from fakegpt.data.meta import DatasetMeta
from fakegpt.errors import FakegptError, one_line
from fakegpt.finetune import distributed, fsdp, lora, optim, resume
from fakegpt.finetune import hooks as hooks_mod
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.batches import Batches
from fakegpt.finetune.best_model import BestModelWriter
from fakegpt.finetune.checks import check, source_val_sets
from fakegpt.finetune.config import ADAPTER_METHODS, FinetuneConfig
from fakegpt.finetune.mfu import flops_per_token, peak_flops
from fakegpt.finetune.step import Objective
from fakegpt.models.architecture import fill_tied
from fakegpt.models.checkpoint import CHECKPOINT_DIR
from fakegpt.models.device import resolve_device, resolve_dtype, torch_dtype
from fakegpt.models.loading import load_model, model_from_config, resolve_pretrained, scratch_model, use_fused_gelu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resolved:
    """The configuration as this run uses it, and what checking it found."""

    cfg: FinetuneConfig  # device, dtype and compile resolved; data_dir a local folder
    info: distributed.Dist
    device: torch.device
    folder: str  # the model it starts from: a folder, hub name or "scratch"
    meta: DatasetMeta
    resumed: resume.Resumed | None
    tags: dict | None  # the caller's MLflow tags, and the data's URI when the data came from one

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR


def resolve(cfg: FinetuneConfig, info: distributed.Dist, tags: dict | None, given: frozenset[str] | None) -> Resolved:
    """`cfg` resolved and checked; an earlier run's leftovers in its out_dir removed (rank 0)."""
    if info.main:
        state_mod.remove_leftovers(cfg.out_dir)  # a killed write's temporary files (gigabytes at gpt2-xl)
    # runs:/<prepare run>/data, as the pipeline passes it: downloaded first, so that a resume given the URI
    # again compares the data it names with the saved run's (its download folder differs each time)
    if tracking.is_artifact_uri(cfg.data_dir):
        tags = {**(tags or {}), tracking.TAG_DATA_URI: cfg.data_dir}
    local = _with_local_data(cfg)
    resumed = None
    if local.init_from == "resume":
        resumed = resume.resolve(local, config_mod.non_default_keys(local) if given is None else given)
    run_cfg = resumed.cfg if resumed is not None else local
    device = distributed.local_device(info, resolve_device(run_cfg.device))
    folder, meta = check(run_cfg, info.world_size, None if resumed is None else resumed.folder)
    if resumed is not None and meta.to_dict() != resumed.info.data:
        raise FakegptError(
            f"--data-dir {run_cfg.data_dir}: its meta.json is not the one the run in {run_cfg.out_dir} was trained "
            "on (the data was prepared again); start a new run in another --out-dir"
        )
    if resumed is None and info.main:
        _clear_earlier_run(run_cfg)
    resolved = dataclasses.replace(
        run_cfg,
        device=str(device),
        dtype=resolve_dtype(run_cfg.dtype, device, training=True),
        compile=device.type == "cuda" if run_cfg.compile is None else run_cfg.compile,
    )
    return Resolved(resolved, info, device, folder, meta, resumed, tags)


def _with_local_data(cfg: FinetuneConfig) -> FinetuneConfig:
    if not tracking.is_artifact_uri(cfg.data_dir):
        return cfg
    return dataclasses.replace(cfg, data_dir=str(tracking.local_path(cfg.data_dir)))


def _clear_earlier_run(cfg: FinetuneConfig) -> None:
    """A new run in a folder that held another: its resume states and LoRA adapters would be taken for ours."""
    if state_mod.saved(cfg.out_dir):
        n = state_mod.remove_all(cfg.out_dir)
        log.warning("%s: a new run; removed %d resume state(s) of an earlier run there", cfg.out_dir, n)
    if cfg.method not in ADAPTER_METHODS:
        shutil.rmtree(Path(cfg.out_dir) / lora.ADAPTER_DIR, ignore_errors=True)


@dataclass(frozen=True)
class RunSetup(Resolved):
    """Everything the loop works with, built once; what changes as it runs is in `Progress`."""

    init_from: str  # the base model, also for a resumed run
    run_uid: str  # this run's identity across resumes (the resume state and the best model both carry it)
    model: torch.nn.Module  # the HF model (LoRA-wrapped with --method lora)
    objective: torch.nn.Module  # the loss module around it (FSDP-sharded or DDP-wrapped, compiled)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    train_batches: Batches
    val_batches: Batches
    fixed: dict[str, Any]  # split -> fixed evaluation window starts
    source_val: dict[str, tuple[Batches, Any]]  # source -> (batches, fixed starts)
    accum: int  # micro-steps per rank per iteration
    tokens_per_iter: int
    flops_token: float
    peak: float | None  # the card's peak FLOP/s in the run's dtype (MFU), None off CUDA
    sharded: bool  # FSDP: saving gathers the full weights, a collective every rank takes part in
    best_writer: BestModelWriter
    hooks: tuple[hooks_mod.Hooks, ...]  # rank 0's; empty on the other ranks


def build(r: Resolved, attached: Sequence[hooks_mod.Hooks] = ()) -> RunSetup:
    """Model, loss module, optimizer, batches and hooks for `r` (the weights of a resume state come in `start`)."""
    cfg, info, device = r.cfg, r.info, r.device
    model = load(cfg, r.folder, device, r.resumed)
    model.train()
    sharded = cfg.parallel == "fsdp" and info.world_size > 1
    objective = _loss_module(model, cfg, info, device, sharded)
    train_data, val_data = (open_bin(cfg.data_dir, s, cfg.block_size) for s in ("train", "val"))
    n_eval = cfg.eval_iters * cfg.batch_size
    tokenizer = tokenizer_folder(r.folder, r.resumed)
    saved = r.resumed.info if r.resumed is not None else None
    return RunSetup(
        **{f.name: getattr(r, f.name) for f in dataclasses.fields(Resolved)},
        init_from=saved.init_from if saved is not None else cfg.init_from,
        run_uid=(saved.run_uid if saved is not None else "") or uuid.uuid4().hex,
        model=model,
        objective=objective,
        optimizer=build_optimizer(model, cfg),  # after FSDP's sharding: it sees the DTensor shards
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16"),
        autocast=(
            torch.autocast(device.type, dtype=torch_dtype(cfg.dtype))
            if cfg.dtype != "float32"
            else contextlib.nullcontext()
        ),
        train_batches=Batches(train_data, cfg.batch_size, cfg.block_size, device, seed=cfg.seed),
        val_batches=Batches(val_data, cfg.batch_size, cfg.block_size, device, seed=0),
        fixed={
            "train": eval_starts(len(train_data), cfg.block_size, n_eval),
            "val": eval_starts(len(val_data), cfg.block_size, n_eval),
        },
        source_val=_source_val_sets(cfg, r.meta, device, n_eval),
        accum=cfg.gradient_accumulation_steps // info.world_size,
        tokens_per_iter=cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps,
        flops_token=flops_per_token(model, cfg.block_size),
        peak=peak_flops(device, cfg.dtype) if device.type == "cuda" else None,  # MFU against this very card
        sharded=sharded,
        best_writer=BestModelWriter(background=cfg.background_save, tokenizer_from=tokenizer),
        hooks=(*attached, *hooks_mod.from_config(cfg, model, tokenizer)) if info.main else (),
    )


def load(
    cfg: FinetuneConfig, folder: str, device: torch.device, resumed: resume.Resumed | None = None
) -> torch.nn.Module:
    """The model to train, on `device`: pretrained, scratch, 4-bit for QLoRA, or the shape of a resume state."""
    # LoRA resumes from its base model loaded again (the state holds only the adapters), a full fine-tune from
    # the shape saved with the state
    base = resumed.info.init_from if resumed is not None and cfg.method in ADAPTER_METHODS else None
    if resumed is not None and base is None:  # the shape from the state; its weights are loaded by `restore`
        model = model_from_config(state_mod.model_config(resumed.folder), str(resumed.folder))
    elif (base or cfg.init_from) == "scratch":
        torch.manual_seed(cfg.seed)
        model = scratch_model(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.dropout)
    elif cfg.method == "qlora":  # the frozen base in 4-bit NF4, computing in the run's dtype
        lora.require_4bit(device)
        compute = torch_dtype(cfg.dtype)
        model = load_model(base or folder, dtype=compute, device=str(device), dropout=cfg.dropout, four_bit=compute)
        model = lora.prepare_quantized(model, cfg)
    else:
        model = load_model(base or folder, dtype=torch.float32, dropout=cfg.dropout)
    if base is not None and resumed is not None:
        lora.check_base(model, state_mod.model_config(resumed.folder), base, resumed.folder)
    use_fused_gelu(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method in ADAPTER_METHODS:
        model = lora.wrap(model, cfg)  # base frozen: the optimizer sees the adapters only
    return model.to(device)


def _loss_module(
    model: torch.nn.Module, cfg: FinetuneConfig, info: distributed.Dist, device: torch.device, sharded: bool
) -> torch.nn.Module:
    # The fused output layer + loss is for eager fp32 (the CPU); under autocast or torch.compile the plain
    # logits + cross-entropy path is used (inductor fuses it by itself).
    objective: torch.nn.Module = Objective(model, fused=not cfg.compile and cfg.dtype == "float32")
    if sharded:  # FSDP2: the parameters become DTensor shards, so the optimizer is built after this
        objective = fsdp.shard(objective, model, cfg.dtype)
    elif info.world_size > 1:
        # No buffer broadcast: a causal LM's buffers (position ids, rotary frequencies) never change, and
        # evaluation runs on the unwrapped module.
        objective = DDP(
            objective, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if cfg.compile:
        # compile(DDP(model)), PyTorch's recommended order: the compiled graph is split at DDP's bucket
        # boundaries, so gradient all-reduces overlap the backward pass instead of waiting for its end.
        objective = torch.compile(objective)
    return objective


def build_optimizer(model: torch.nn.Module, cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """The configured optimizer over `model`'s trainable parameters."""
    return optim.build(model, cfg.optimizer, cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.weight_decay)


def _source_val_sets(
    cfg: FinetuneConfig, meta: DatasetMeta, device: torch.device, n_eval: int
) -> dict[str, tuple[Batches, Any]]:
    """Each source's own validation windows, when the run reports per-source losses or selects on one."""
    out = {}
    for source in source_val_sets(cfg.data_dir, meta) if (cfg.eval_sources or cfg.select_on != "val") else []:
        data = open_bin(Path(source["path"]).parent, Path(source["path"]).stem, cfg.block_size)
        batches = Batches(data, cfg.batch_size, cfg.block_size, device, seed=0)
        out[source["name"]] = (batches, eval_starts(len(data), cfg.block_size, n_eval))
    return out


def tokenizer_folder(folder: str, resumed: resume.Resumed | None) -> str | None:
    """Where the model's tokenizer files are, for its checkpoints: the model folder it started from (for a
    resumed run, the base model its state records); None for a scratch GPT-2."""
    base = resumed.info.init_from if resumed is not None else folder
    return None if base == "scratch" else resolve_pretrained(base)


@dataclass
class Progress:
    """Where the run stands: the loop's only mutable state (saved with every resume state)."""

    tokens_per_iter: int
    it: int = 0
    best_val: float = math.inf
    best_iter: int = -1
    last_eval_iter: int = -1
    val_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens_seen, val_loss)
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens_seen, train_loss)
    run_id: str | None = None  # the MLflow run (a resumed run's own, until the store says otherwise)
    start_iter: int = 0  # where this process started, for end-to-end tokens/s
    started: float = field(default_factory=time.perf_counter)

    @property
    def tokens_seen(self) -> int:
        return self.it * self.tokens_per_iter


def start(s: RunSetup) -> Progress:
    """Iteration 0, or where the resume state left off (restored into the model and optimizer)."""
    p = Progress(s.tokens_per_iter)
    if s.resumed is not None:
        restore(s, p)
    p.start_iter = p.it
    return p


def restore(s: RunSetup, p: Progress) -> None:
    """Weights, optimizer, scaler and progress from the resume state, cross-checked with the best model."""
    resumed = s.resumed
    assert resumed is not None  # called only when resuming
    saved = resumed.info
    best = state_mod.cross_check(saved, resumed.folder, s.out_dir)
    weights, payload = state_mod.load_tensors(resumed.folder)
    if s.cfg.method in ADAPTER_METHODS:  # the base model loaded again must be the one the adapters were trained on
        lora.check_base_sum(s.model, saved.extra, saved.init_from, resumed.folder)
    else:  # a linked best-model file leaves a tied output layer out: it is the token embedding again
        weights = fill_tied(weights, s.model)
    try:
        if s.sharded:  # full tensors, read on every rank: each keeps its shard (LoRA is refused under FSDP)
            fsdp.load_full_state(s.model, s.optimizer, weights, payload["optimizer"])
        else:
            if s.cfg.method in ADAPTER_METHODS:
                lora.load_adapter_state(s.model, weights)
            else:
                s.model.load_state_dict(weights)
            s.optimizer.load_state_dict(payload["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise FakegptError(f"{resumed.folder}: damaged resume state ({one_line(exc)})") from None
    if payload.get("scaler") and s.scaler.is_enabled():
        s.scaler.load_state_dict(payload["scaler"])
    p.run_id = saved.run_id or None
    p.it, p.best_val, p.best_iter = saved.iter, saved.best, saved.best_iter
    p.last_eval_iter = int(saved.extra.get("last_eval_iter", -1))
    p.val_curve = [(int(a), float(b)) for a, b in saved.val_curve]
    p.train_curve = [(int(a), float(b)) for a, b in saved.train_curve]
    if best is not None and best.val_loss < p.best_val:  # saved after the state, before a kill: still the best
        p.best_val, p.best_iter = best.val_loss, best.iter
    if not s.info.main:
        return
    log.info(
        "resuming %s from iteration %d (%s)%s; best val/loss %.4f at iteration %d",
        s.out_dir,
        saved.iter,
        resumed.folder.name,
        f"; changed on resume: {resume.describe(resumed.changes)}" if resumed.changes else "",
        p.best_val,
        p.best_iter,
    )
