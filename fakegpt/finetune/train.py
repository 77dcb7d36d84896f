"""`fakegpt finetune`: continue training a causal LM (GPT-2, Llama, Qwen2, ...: what transformers'
AutoModelForCausalLM builds) on prepared token bins.

Reads DIR/train.bin + DIR/val.bin (uint16 GPT-2 ids) and DIR/meta.json written by `fakegpt prepare`, trains
with AdamW and gradient accumulation, evaluates on fixed validation windows every `eval_interval` iterations
(and at the last one), keeps the best model as an HF-format folder OUT/checkpoint/ (weights only, written on
improvement) and the resume state as OUT/state/iter-N/ (weights, optimizer, progress, configuration; written
every `save_interval` iterations / `save_every_minutes`, at the end and on SIGTERM/SIGINT, see
`fakegpt.finetune.state`), and logs everything to MLflow. `--init-from resume --out-dir DIR` continues with the
saved configuration (`fakegpt.finetune.resume`). Under `torchrun --nproc_per_node=N` it trains data-parallel
(DDP): the accumulation steps are split across ranks, gradients are synchronised on the last micro-step only,
and only rank 0 logs and saves. With `--parallel fsdp` the model is sharded across the ranks instead
(`fakegpt.finetune.fsdp`); every rank then takes part in each save (gathering the full weights), rank 0 writes.

The loop (`_train`) is short: `_setup` builds model, optimizer and batches (or restores them), then per
iteration `_evaluate` (every eval_interval: losses, best model, metrics, callback), `_step` (one optimizer
step) and `_save_state` when due or asked to stop. The step's parts (schedule, accumulation, update, loss
estimate) are in `fakegpt.finetune.step`; the MLflow run, its artifacts and the registry in
`fakegpt.finetune.record`; the best model's background write in `fakegpt.finetune.best_model`.

Configuration field names are nanoGPT's. The defaults reproduce the original study's fine-tune (nanoGPT's
finetune_shakespeare settings): micro-batch 1 x 32 accumulation steps x block 1024 = 32,768 tokens per
iteration, constant learning rate 3e-5, evaluation every 5 iterations over 40 batches, save on improvement.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from fakegpt import config as config_mod
from fakegpt import tracking
from fakegpt.data.bins import eval_starts, open_bin
from fakegpt.data.meta import DatasetMeta
from fakegpt.errors import FakegptError, one_line
from fakegpt.finetune import distributed, fsdp, launch, lora, optim, record, resume
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.batches import Batches
from fakegpt.finetune.best_model import BestModelWriter
from fakegpt.finetune.checks import check, source_val_sets
from fakegpt.finetune.config import ADAPTER_METHODS, FinetuneConfig
from fakegpt.finetune.loss import LinearCrossEntropy
from fakegpt.finetune.mfu import flops_per_token, peak_flops
from fakegpt.finetune.saving import SaveSchedule, StopSignals
from fakegpt.finetune.step import Objective, accumulate, estimate, gpu_memory, lr_at, update
from fakegpt.measure.claim_probe import ClaimProbe
from fakegpt.models.architecture import context_length, fill_tied
from fakegpt.models.checkpoint import CHECKPOINT_DIR, TrainingInfo
from fakegpt.models.codec import codec_for
from fakegpt.models.device import resolve_device, resolve_dtype, tf32, torch_dtype
from fakegpt.models.loading import load_model, model_from_config, resolve_pretrained, scratch_model, use_fused_gelu

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"  # OUT/metrics.jsonl: every metric point, whatever the tracking server does


@dataclass
class EvalResult:
    """One evaluation, as `on_eval` callbacks (tune's pruning) see it."""

    iter: int
    tokens_seen: int
    train_loss: float  # train split, fixed windows (nanoGPT's estimate_loss)
    val_loss: float  # validation split, fixed windows: comparable across runs on the same data folder
    lr: float


@dataclass
class FinetuneResult:
    """What a finetune run ended with: best loss and iteration, progress, where the checkpoint is, the run."""

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


class Preempted(FakegptError):
    """SIGTERM/SIGINT: the resume state was saved and training stopped; the CLI exits 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_status = 128 + signum


# --- the training loop ---------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised on ranks > 0 when rank 0 stops training (its callback raised or the loss was not finite)."""


def _optimizer(model: torch.nn.Module, cfg: FinetuneConfig, device: torch.device) -> torch.optim.Optimizer:
    return optim.build(model, cfg.optimizer, cfg.learning_rate, (cfg.beta1, cfg.beta2), cfg.weight_decay)


def _load(
    cfg: FinetuneConfig, folder: str, device: torch.device, resumed: resume.Resumed | None = None
) -> torch.nn.Module:
    # LoRA resumes from its base model loaded again (the state holds only the adapters), a full fine-tune from
    # the shape saved with the state
    base = resumed.info.init_from if resumed is not None and cfg.method in ADAPTER_METHODS else None
    if resumed is not None and base is None:  # the shape from the state; its weights are loaded by _setup
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
    if base is not None:
        lora.check_base(model, state_mod.model_config(resumed.folder), base, resumed.folder)
    use_fused_gelu(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method in ADAPTER_METHODS:
        model = lora.wrap(model, cfg)  # base frozen: the optimizer sees the adapters only
    return model.to(device)


def finetune(
    cfg: FinetuneConfig,
    on_eval: Callable[[EvalResult], None] | None = None,
    *,
    nested: bool = False,
    run_name: str | None = None,
    tags: dict | None = None,
    given: frozenset[str] | None = None,
) -> FinetuneResult:
    """Fine-tune per `cfg`; returns the best validation loss and where the best checkpoint is.

    `on_eval` runs on rank 0 after every evaluation (after the checkpoint for it is saved); any exception it
    raises stops training, ends the MLflow run as KILLED and is re-raised. With `nested`, the run is a child
    of the active MLflow run. `given` names the fields the user set (flags + YAML, `config.parse_given`); on
    resume they are checked against the saved configuration. Library callers may leave it out: then every
    field that differs from FinetuneConfig's default counts as given.
    """
    info = distributed.from_env()
    if info.main:
        state_mod.remove_leftovers(cfg.out_dir)  # a killed write's temporary files (gigabytes at gpt2-xl)
    # runs:/<prepare run>/data, as the pipeline passes it: downloaded first, so that a resume given the URI
    # again compares the data it names with the saved run's (its download folder differs each time)
    if tracking.is_artifact_uri(cfg.data_dir):
        tags = {**(tags or {}), tracking.TAG_DATA_URI: cfg.data_dir}
        cfg = dataclasses.replace(cfg, data_dir=str(tracking.local_path(cfg.data_dir)))
    resumed = None
    if cfg.init_from == "resume":
        resumed = resume.resolve(cfg, config_mod.non_default_keys(cfg) if given is None else given)
        cfg = resumed.cfg
    device = distributed.local_device(info, resolve_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device, training=True)
    use_compile = device.type == "cuda" if cfg.compile is None else cfg.compile
    folder, meta = check(cfg, info.world_size, None if resumed is None else resumed.folder)
    if resumed is not None and meta.to_dict() != resumed.info.data:
        raise FakegptError(
            f"--data-dir {cfg.data_dir}: its meta.json is not the one the run in {cfg.out_dir} was trained on "
            "(the data was prepared again); start a new run in another --out-dir"
        )
    if resumed is None and info.main and state_mod.saved(cfg.out_dir):
        n = state_mod.remove_all(cfg.out_dir)
        log.warning("%s: a new run; removed %d resume state(s) of an earlier run there", cfg.out_dir, n)
    if resumed is None and info.main and cfg.method not in ADAPTER_METHODS:
        shutil.rmtree(Path(cfg.out_dir) / lora.ADAPTER_DIR, ignore_errors=True)  # an earlier LoRA run's adapters
    resolved = dataclasses.replace(cfg, device=str(device), dtype=dtype, compile=use_compile)
    distributed.setup(info, device)
    try:
        with distributed.PeerWatch(info) as watch, tf32(device.type == "cuda"):  # TF32: training only
            try:
                return _train(resolved, folder, meta, info, device, resumed, on_eval, nested, run_name, tags, watch)
            except (Preempted, NonFiniteLossError, _Stop):
                raise  # every rank stops together: nothing to tell the others
            except Exception as exc:
                peer = watch.peer_failure(wait=2.0)  # a failed collective here is usually another rank's failure
                if peer is not None:
                    raise FakegptError(f"rank {info.rank} stopped: {peer}") from None
                watch.fail(one_line(exc))
                raise
    finally:
        distributed.teardown()


@dataclass
class _Trainer:
    """What the loop works on: the model and its optimizer, batches, and where the run stands."""

    cfg: FinetuneConfig
    info: distributed.Dist
    device: torch.device
    meta: DatasetMeta
    init_from: str  # the base model, also for a resumed run
    run_uid: str  # this run's identity across resumes (the resume state and the best model both carry it)
    model: torch.nn.Module
    objective: torch.nn.Module  # the loss module (compiled / DDP-wrapped)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: Any
    train_batches: Batches
    val_batches: Batches
    fixed: dict[str, Any]  # split -> fixed evaluation window starts
    accum: int  # micro-steps per rank per iteration
    tokens_per_iter: int
    flops_token: float
    peak: float | None
    it: int = 0
    best_val: float = math.inf
    best_iter: int = -1
    last_eval_iter: int = -1
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    run_id: str | None = None
    best_writer: BestModelWriter = field(default_factory=BestModelWriter)
    source_val: dict[str, tuple[Batches, Any]] = field(default_factory=dict)  # source -> (batches, fixed starts)
    probe: ClaimProbe | None = None  # scores --claims on the model while it trains (rank 0)
    last_claim_iter: int = -1
    claim_seconds: float = 0.0  # time spent scoring claims, for its share of the run
    started: float = field(default_factory=time.perf_counter)  # for end-to-end tokens/s
    start_iter: int = 0
    sharded: bool = False  # FSDP: saving gathers the full weights, a collective every rank takes part in

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / CHECKPOINT_DIR

    @property
    def tokens_seen(self) -> int:
        return self.it * self.tokens_per_iter

    def result(self) -> FinetuneResult:
        return FinetuneResult(
            self.best_val,
            self.best_iter,
            self.it,
            self.tokens_seen,
            self.out_dir,
            self.ckpt_dir,
            self.run_id,
            list(self.val_curve),
        )


def tokenizer_folder(folder: str, resumed: resume.Resumed | None) -> str | None:
    """Where the model's tokenizer files are, for its checkpoints: the model folder it started from (for a
    resumed run, the base model its state records); None for a scratch GPT-2."""
    base = resumed.info.init_from if resumed is not None else folder
    return None if base == "scratch" else resolve_pretrained(base)


def _setup(
    cfg: FinetuneConfig,
    folder: str,
    meta: DatasetMeta,
    info: distributed.Dist,
    device: torch.device,
    resumed: resume.Resumed | None,
) -> _Trainer:
    """Model, optimizer, scaler, loss module, batches; restored from the resume state when resuming."""
    model = _load(cfg, folder, device, resumed)
    model.train()
    sharded = cfg.parallel == "fsdp" and info.world_size > 1
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
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
    optimizer = _optimizer(model, cfg, device)
    autocast = (
        torch.autocast(device.type, dtype=torch_dtype(cfg.dtype))
        if cfg.dtype != "float32"
        else contextlib.nullcontext()
    )
    train_data, val_data = (open_bin(cfg.data_dir, s, cfg.block_size) for s in ("train", "val"))
    tokenizer = tokenizer_folder(folder, resumed)
    n_eval = cfg.eval_iters * cfg.batch_size
    t = _Trainer(
        cfg=cfg,
        info=info,
        device=device,
        meta=meta,
        init_from=cfg.init_from,
        run_uid=uuid.uuid4().hex,
        model=model,
        objective=objective,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast,
        train_batches=Batches(train_data, cfg.batch_size, cfg.block_size, device, seed=cfg.seed),
        val_batches=Batches(val_data, cfg.batch_size, cfg.block_size, device, seed=0),
        fixed={
            "train": eval_starts(len(train_data), cfg.block_size, n_eval),
            "val": eval_starts(len(val_data), cfg.block_size, n_eval),
        },
        accum=cfg.gradient_accumulation_steps // info.world_size,
        tokens_per_iter=cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps,
        flops_token=flops_per_token(model, cfg.block_size),
        peak=peak_flops(device, cfg.dtype) if device.type == "cuda" else None,  # MFU against this very card
        best_writer=BestModelWriter(background=cfg.background_save, tokenizer_from=tokenizer),
        sharded=sharded,
    )
    for source in source_val_sets(cfg.data_dir, meta) if (cfg.eval_sources or cfg.select_on != "val") else []:
        data = open_bin(Path(source["path"]).parent, Path(source["path"]).stem, cfg.block_size)
        batches = Batches(data, cfg.batch_size, cfg.block_size, device, seed=0)
        t.source_val[source["name"]] = (batches, eval_starts(len(data), cfg.block_size, n_eval))
    if cfg.claims and info.main:
        codec = codec_for(tokenizer) if tokenizer else None  # the claims in the model's own tokens
        t.probe = ClaimProbe(cfg.claims, batch_size=max(1, cfg.batch_size * 4), codec=codec)
        t.probe.check_context(context_length(model.config, cfg.block_size))
    if resumed is not None:
        _restore(t, resumed)
    t.start_iter = t.it
    return t


def _restore(t: _Trainer, resumed: resume.Resumed) -> None:
    """Weights, optimizer, scaler and progress from the resume state, cross-checked with the best model."""
    s = resumed.info
    best = state_mod.cross_check(s, resumed.folder, t.out_dir)
    weights, payload = state_mod.load_tensors(resumed.folder)
    if t.cfg.method in ADAPTER_METHODS:  # the base model loaded again must be the one the adapters were trained on
        lora.check_base_sum(t.model, s.extra, s.init_from, resumed.folder)
    else:  # a linked best-model file leaves a tied output layer out: it is the token embedding again
        weights = fill_tied(weights, t.model)
    try:
        if t.sharded:  # full tensors, read on every rank: each keeps its shard (LoRA is refused under FSDP)
            fsdp.load_full_state(t.model, t.optimizer, weights, payload["optimizer"])
        else:
            if t.cfg.method in ADAPTER_METHODS:
                lora.load_adapter_state(t.model, weights)
            else:
                t.model.load_state_dict(weights)
            t.optimizer.load_state_dict(payload["optimizer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise FakegptError(f"{resumed.folder}: damaged resume state ({one_line(exc)})") from None
    if payload.get("scaler") and t.scaler.is_enabled():
        t.scaler.load_state_dict(payload["scaler"])
    t.init_from, t.run_uid, t.run_id = s.init_from, s.run_uid or t.run_uid, s.run_id or None
    t.it, t.best_val, t.best_iter = s.iter, s.best, s.best_iter
    t.last_eval_iter = int(s.extra.get("last_eval_iter", -1))
    t.val_curve = [(int(a), float(b)) for a, b in s.val_curve]
    t.train_curve = [(int(a), float(b)) for a, b in s.train_curve]
    if best is not None and best.val_loss < t.best_val:  # saved after the state, before a kill: still the best
        t.best_val, t.best_iter = best.val_loss, best.iter
    if not t.info.main:
        return
    log.info(
        "resuming %s from iteration %d (%s)%s; best val/loss %.4f at iteration %d",
        t.out_dir,
        s.iter,
        resumed.folder.name,
        f"; changed on resume: {resume.describe(resumed.changes)}" if resumed.changes else "",
        t.best_val,
        t.best_iter,
    )


def _evaluate(t: _Trainer) -> tuple[float, float, dict[str, float]]:
    """(train, val, per-source val) loss on the fixed windows; a non-finite one stops training naming the
    iteration. `val` is the loss that picks the best model: val.bin's, or the `--select-on` source's."""
    plain = getattr(t.objective, "module", t.objective)  # no DDP hooks in evaluation
    train_loss = estimate(plain, t.train_batches, t.fixed["train"], t.info, t.autocast, t.sharded)
    val_loss = estimate(plain, t.val_batches, t.fixed["val"], t.info, t.autocast, t.sharded)
    by_source = {
        name: estimate(plain, batches, starts, t.info, t.autocast, t.sharded)
        for name, (batches, starts) in t.source_val.items()
    }
    if t.cfg.select_on != "val":
        by_source["all"], val_loss = val_loss, by_source[t.cfg.select_on]
    if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
        raise NonFiniteLossError(_nonfinite_message("evaluation", t.it, val_loss, t.best_iter, t.ckpt_dir))
    t.last_eval_iter = t.it
    t.val_curve.append((t.tokens_seen, val_loss))
    return train_loss, val_loss, by_source


def _record_best(t: _Trainer, val_loss: float) -> bool:
    """Every rank: keep the best loss and iteration; True when this evaluation writes the best model (it
    improved, or --always-save-checkpoint). The losses are all-reduced, so all ranks decide alike."""
    improved = val_loss < t.best_val
    if improved:
        t.best_val, t.best_iter = val_loss, t.it
    return improved or t.cfg.always_save_checkpoint


def _save_best(t: _Trainer, val_loss: float, weights: dict | None = None) -> None:
    """OUT/checkpoint/: the model of this evaluation as an HF folder, weights only (no optimizer).
    `weights`: the full weights gathered under FSDP (else a snapshot of the model is taken)."""
    training_info = TrainingInfo(
        init_from=t.init_from,
        config=config_mod.to_dict(t.cfg),
        data=t.meta.to_dict(),
        iter=t.it,
        val_loss=val_loss,
        tokens_seen=t.tokens_seen,
        extra={state_mod.RUN_UID_KEY: t.run_uid},
    )
    if lora.is_lora(t.model):  # merged weights as a plain HF model, and the same iteration's adapters beside them
        adapter = lora.adapter_snapshot(t.model)
        t.best_writer.submit(
            lora.base_model(t.model),
            t.ckpt_dir,
            training_info,
            weights=lora.merged_state(t.model),
            then=lambda: lora.write_adapter(t.out_dir / lora.ADAPTER_DIR, adapter, training_info),
        )
        return
    # a host snapshot taken during the next step (or FSDP's gathered copy as it is); written in the background
    t.best_writer.submit(t.model, t.ckpt_dir, training_info, weights, owned=weights is not None)


def _report_evaluation(
    t: _Trainer,
    train_loss: float,
    val_loss: float,
    by_source: dict[str, float],
    lr: float,
    metrics: tracking.MetricLogger,
    on_eval: Callable[[EvalResult], None] | None,
    save: bool,
    weights: dict | None = None,
) -> BaseException | None:
    """Rank 0: best model (when `save`, from `_record_best`), metrics, callback. Returns the exception the
    callback raised (a stop request). `weights`: the best model's full weights, gathered under FSDP."""
    logged = {
        tracking.M_VAL_LOSS: val_loss,
        tracking.M_EVAL_TRAIN_LOSS: train_loss,
        tracking.M_TOKENS_SEEN: t.tokens_seen,
        **{tracking.source_val_metric(name): loss for name, loss in by_source.items()},
    }
    if save:
        _save_best(t, val_loss, weights)
        logged[tracking.M_BEST_VAL_LOSS] = t.best_val
    metrics.log(logged, step=t.it)
    if on_eval is not None:
        t.best_writer.wait()  # the callback may read (or delete) this evaluation's checkpoint
        try:
            on_eval(EvalResult(t.it, t.tokens_seen, train_loss, val_loss, lr))
        except BaseException as exc:  # noqa: B036 - any stop request, re-raised by the caller
            return exc
    return None


def _score_claims(t: _Trainer, metrics: tracking.MetricLogger) -> None:
    """The claim set's scores on the model now, logged with step = iteration (and tokens seen)."""
    started = time.perf_counter()
    scores = t.probe(getattr(t.model, "_orig_mod", t.model))  # type: ignore[misc]
    t.claim_seconds += time.perf_counter() - started
    t.last_claim_iter = t.it
    metrics.log({**scores, tracking.M_TOKENS_SEEN: t.tokens_seen}, step=t.it)


def _step(t: _Trainer, lr: float, stop_asked: bool) -> tuple[float, bool]:
    """One optimizer step of `accum` micro-batches per rank. Returns (mean loss over ranks, whether any rank
    was asked to stop); both travel in the one all-reduce of the step."""
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    # Batches and dropout are re-seeded from (seed, rank, iteration): the iteration is the data position.
    seeds = np.random.SeedSequence((t.cfg.seed, t.info.rank, t.it))
    t.train_batches.rng = np.random.default_rng(seeds)
    torch.manual_seed(int(seeds.generate_state(1)[0]))
    local_loss = accumulate(t.objective, t.train_batches, t.accum, t.autocast, t.scaler)
    step_loss, stops = distributed.all_sum([local_loss, float(stop_asked)], t.device)
    step_loss /= t.info.world_size
    if not math.isfinite(step_loss):
        t.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(_nonfinite_message("training", t.it, step_loss, t.best_iter, t.ckpt_dir))
    t.best_writer.before_update()  # the best model's snapshot, taken during this step's passes, is complete
    update(t.model, t.optimizer, t.scaler, t.cfg.grad_clip)
    t.it += 1
    t.train_curve.append((t.tokens_seen, step_loss))
    return step_loss, stops > 0


def _save_state(t: _Trainer) -> Path | None:
    """OUT/state/iter-N/: everything needed to continue exactly here (rank 0; under FSDP every rank gathers)."""
    unwrapped = getattr(t.model, "_orig_mod", t.model)
    if t.sharded:  # full (unsharded) weights and optimizer state, so any --parallel (or one process) resumes
        weights, optimizer_state = fsdp.full_state(t.model, t.optimizer)
        if not t.info.main:
            return None
    else:  # LoRA: the adapters only (the frozen base is loaded again from init_from on resume)
        weights = lora.adapter_state(unwrapped) if lora.is_lora(unwrapped) else unwrapped.state_dict()
        optimizer_state = t.optimizer.state_dict()
    info = state_mod.ResumeInfo(
        iter=t.it,
        best_val_loss=t.best_val if math.isfinite(t.best_val) else None,
        best_iter=t.best_iter,
        init_from=t.init_from,
        run_id=t.run_id or "",
        run_uid=t.run_uid,
        config=config_mod.to_dict(t.cfg),
        data=t.meta.to_dict(),
        files={},
        val_curve=[list(p) for p in t.val_curve],
        train_curve=[list(p) for p in t.train_curve],
        extra={"last_eval_iter": t.last_eval_iter, **lora.state_extra(unwrapped)},
    )
    payload = {
        "optimizer": optimizer_state,
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else {},
    }

    def best_model_file() -> state_mod.WeightsFile | None:
        """Called by the state writer after the optimizer file, which a best-model write in flight overlaps."""
        t.best_writer.wait()  # the best model on disk first: a state never records a best that is not written
        same = t.best_writer.last_weights
        # the best model of this very iteration (the end of a run whose last evaluation improved) holds these
        # weights, durable and checksummed: the state links its file instead of writing them again
        if same is not None and same[0] == t.it and not lora.is_lora(unwrapped):
            return same[1]
        return None

    config = unwrapped.config.to_dict()
    return state_mod.write(t.out_dir, info, weights, payload, config, t.cfg.keep_states, best_model_file)


def _train(
    cfg: FinetuneConfig,
    folder: str,
    meta: DatasetMeta,
    info: distributed.Dist,
    device: torch.device,
    resumed: resume.Resumed | None,
    on_eval: Callable[[EvalResult], None] | None,
    nested: bool,
    run_name: str | None,
    tags: dict | None,
    watch: distributed.PeerWatch,
) -> FinetuneResult:
    t = _setup(cfg, folder, meta, info, device, resumed)
    stop_exc: list[BaseException] = []  # a deliberate stop: on_eval's exception, or Preempted
    run_ctx = (
        record.mlflow_run(cfg, t.init_from, t.run_id, meta, resumed, nested, run_name, tags, stop_exc)
        if info.main
        else None
    )
    with run_ctx or contextlib.nullcontext(None) as active, StopSignals() as signals:
        if active is not None:
            t.run_id = active.info.run_id
            run_id = t.run_id  # another rank failed: this run is FAILED, not left RUNNING by the hard exit
            watch.on_peer_failure = lambda message: tracking.update_run(run_id, {tracking.TAG_ERROR: message}, "FAILED")
        local = t.out_dir / METRICS_FILE if info.main else None
        with tracking.MetricLogger(t.run_id if info.main else None, local) as metrics:
            try:
                _loop(t, metrics, signals, on_eval, stop_exc)
            except BaseException:
                t.best_writer.wait(raise_error=False)  # the last good best model stays whole on disk
                raise
            finally:
                LinearCrossEntropy.release()  # the output layer's CPU buffer is not kept past training
            t.best_writer.wait()
        if info.main:
            if t.probe is not None:
                tracking.log_metrics({tracking.M_CLAIM_EVAL_SECONDS: t.claim_seconds})
            record.final_artifacts(t.out_dir, t.ckpt_dir, t.train_curve, t.val_curve, t.best_iter)
            if cfg.register_as and t.ckpt_dir.is_dir():
                record.register(t.ckpt_dir, t.run_id, cfg.register_as, cfg.register_alias)
    return t.result()


def _loop(
    t: _Trainer,
    metrics: tracking.MetricLogger,
    signals: StopSignals,
    on_eval: Callable[[EvalResult], None] | None,
    stop_exc: list[BaseException],
) -> None:
    cfg, main = t.cfg, t.info.main
    schedule = SaveSchedule(cfg, t, t.device if t.sharded else None)
    saves = main or t.sharded  # the ranks that take part in a save: under FSDP all (gathering is a collective)
    bar = tqdm(total=cfg.max_iters, initial=t.it, desc="finetune", unit="it", disable=None if main else True)
    t_last = time.perf_counter()
    while True:
        lr = lr_at(cfg, t.it)
        if (t.it % cfg.eval_interval == 0 or t.it == cfg.max_iters) and t.it != t.last_eval_iter:
            train_loss, val_loss, by_source = _evaluate(t)
            save = _record_best(t, val_loss)
            # FSDP: gathering the full weights is a collective every rank takes part in; rank 0 writes them
            weights = fsdp.full_model_state(t.model) if save and t.sharded else None
            if main:
                stop = _report_evaluation(t, train_loss, val_loss, by_source, lr, metrics, on_eval, save, weights)
                if stop is not None:
                    stop_exc.append(stop)
                bar.set_postfix(val=f"{val_loss:.4f}", best=f"{t.best_val:.4f}")
            if distributed.broadcast_flag(bool(stop_exc), t.device):
                raise stop_exc[0] if stop_exc else _Stop()
            if t.probe is not None and not cfg.claim_eval_interval:
                _score_claims(t, metrics)
            t_last = time.perf_counter()  # tokens/s measures training, not evaluation
        if t.probe is not None and cfg.claim_eval_interval and t.it != t.last_claim_iter:
            if t.it % cfg.claim_eval_interval == 0 or t.it == cfg.max_iters:
                _score_claims(t, metrics)
                t_last = time.perf_counter()
        if t.it >= cfg.max_iters:
            break
        step_loss, stop = _step(t, lr, signals.signum is not None)
        bar.update(1)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        if main and (t.it % cfg.log_interval == 0 or t.it == cfg.max_iters):
            tokens_per_s = t.tokens_per_iter / dt
            logged = {
                tracking.M_TRAIN_LOSS: step_loss,
                tracking.M_LR: lr,
                tracking.M_TRAIN_TOKENS_PER_S: tokens_per_s,
                # end to end: evaluation, claim scoring and checkpoint writes included
                tracking.M_TRAIN_TOKENS_PER_S_TOTAL: (t.it - t.start_iter) * t.tokens_per_iter / (now - t.started),
            }
            if t.peak:
                logged[tracking.M_MFU] = t.flops_token * tokens_per_s / (t.peak * t.info.world_size)
            if t.device.type == "cuda":
                logged.update(gpu_memory(t.device))
            metrics.log(logged, step=t.it)
        if saves and cfg.save_state and (stop or schedule.due(t.it)):
            _save_state(t)
            metrics.flush()  # the store holds every point up to the state a resume would continue from
            schedule.done(t)
        if stop:
            bar.close()
            distributed.all_sum([0.0], t.device)  # every rank waits for rank 0's save before exiting
            raise _preempted(t, signals.signum or signal.SIGTERM, stop_exc)
    bar.close()
    if saves and cfg.save_state and schedule.changed_since_save(t):  # the end (and its final evaluation)
        _save_state(t)


def _preempted(t: _Trainer, signum: int, stop_exc: list[BaseException]) -> Preempted:
    name = signal.Signals(signum).name
    where = (
        f"the resume state is in {state_mod.folder_for(t.out_dir, t.it)}; continue with "
        f"`fakegpt finetune --init-from resume --out-dir {t.out_dir}`"
        if t.cfg.save_state
        else "no resume state (--save-state false)"
    )
    exc = Preempted(f"stopped by {name} at iteration {t.it}; {where}", signum)
    stop_exc.append(exc)
    return exc


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


def main(argv: list[str]) -> int:
    """`fakegpt finetune [flags]`; returns the exit status."""
    cfg, given = config_mod.parse_given(
        FinetuneConfig,
        argv,
        prog="fakegpt finetune",
        description="Fine-tune a causal language model (GPT-2, Llama, Qwen2, ...) on prepared token bins; tracked "
        "in MLflow. "
        "`--init-from resume --out-dir DIR` alone continues a run with its saved configuration.",
    )
    if cfg.plan:  # memory per GPU and which cards fit; no data, no MLflow, no weights
        from fakegpt.finetune import plan

        return plan.main(cfg, given)
    if cfg.nproc_per_node > 1 and not launch.under_torchrun():  # this process becomes torchrun's launcher
        return launch.run(cfg.nproc_per_node, cfg.gradient_accumulation_steps, argv)
    result = finetune(cfg, given=given)
    if distributed.from_env().main:
        print(
            f"best val/loss {result.best_val_loss:.4f} at iteration {result.best_iter} "
            f"({result.iters_done} iterations, {result.tokens_seen:,} tokens); checkpoint: {result.checkpoint_dir}"
            + (f"; MLflow run {result.run_id}" if result.run_id else "")
        )
    return 0
