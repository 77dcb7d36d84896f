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

The recipe, in call order (and in this file's order): `finetune` resolves the configuration and builds one
frozen `RunSetup` (`fakegpt.finetune.setup`), `_train` opens the MLflow run around `_loop`, which per iteration
runs `_evaluate` when due, the hooks' `on_step`, `_step` (one optimizer step) and the resume state's save when
due or asked to stop; `_train` ends with the hooks' `on_end` and the final artifacts. What watches the run (the
claim probe, tune's pruning) attaches through `fakegpt.finetune.hooks`; the step's parts are in
`fakegpt.finetune.step`, the saves in `fakegpt.finetune.saving`, the MLflow record and its metrics in
`fakegpt.finetune.record`.

Configuration field names are nanoGPT's. The defaults reproduce the original study's fine-tune (nanoGPT's
finetune_shakespeare settings): micro-batch 1 x 32 accumulation steps x block 1024 = 32,768 tokens per
iteration, constant learning rate 3e-5, evaluation every 5 iterations over 40 batches, save on improvement.
"""

from __future__ import annotations

import contextlib
import functools
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fakegpt import config as config_mod
from fakegpt import tracking
from fakegpt.errors import FakegptError, one_line
from fakegpt.finetune import distributed, launch, record, saving, setup
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.hooks import EvalResult, Hooks, Moment, on_ends, on_evals, on_steps
from fakegpt.finetune.loss import LinearCrossEntropy
from fakegpt.finetune.saving import SaveSchedule, StopSignals
from fakegpt.finetune.setup import Progress, RunSetup, tokenizer_folder
from fakegpt.finetune.step import accumulate, estimate, lr_at, update
from fakegpt.models.device import tf32

__all__ = [
    "METRICS_FILE",
    "EvalResult",
    "FinetuneConfig",
    "FinetuneResult",
    "Hooks",
    "NonFiniteLossError",
    "Preempted",
    "finetune",
    "lr_at",
    "main",
    "tokenizer_folder",
]

METRICS_FILE = "metrics.jsonl"  # OUT/metrics.jsonl: every metric point, whatever the tracking server does


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


class _Stop(Exception):
    """Raised on ranks > 0 when rank 0 stops training (a hook raised or the loss was not finite)."""


def finetune(
    cfg: FinetuneConfig,
    on_eval: Callable[[EvalResult], None] | None = None,
    *,
    hooks: Sequence[Hooks] = (),
    nested: bool = False,
    run_name: str | None = None,
    tags: dict | None = None,
    given: frozenset[str] | None = None,
) -> FinetuneResult:
    """Fine-tune per `cfg`; returns the best validation loss and where the best checkpoint is.

    `hooks` run on rank 0 (`fakegpt.finetune.hooks`); an exception one raises stops training, ends the MLflow
    run as KILLED and is re-raised. `on_eval` is a hook of its own, called after every evaluation once the
    checkpoint for it is written. With `nested`, the run is a child of the active MLflow run. `given` names
    the fields the user set (flags + YAML, `config.parse_given`); on resume they are checked against the saved
    configuration. Library callers may leave it out: then every field that differs from FinetuneConfig's
    default counts as given.
    """
    info = distributed.from_env()
    run = setup.resolve(cfg, info, tags, given)  # before any collective: a bad flag stops every rank alike
    attached = [*hooks, *([Hooks(on_eval=on_eval, reads_checkpoint=True)] if on_eval is not None else [])]
    distributed.setup(info, run.device)
    try:
        with distributed.PeerWatch(info) as watch, tf32(run.device.type == "cuda"):  # TF32: training only
            try:
                return _train(setup.build(run, attached), watch, nested, run_name)
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


def _train(s: RunSetup, watch: distributed.PeerWatch, nested: bool, run_name: str | None) -> FinetuneResult:
    """The MLflow run (rank 0) around the loop, then the run's end: hooks, artifacts, registry."""
    p = setup.start(s)
    stop_exc: list[BaseException] = []  # a deliberate stop: a hook's exception, or Preempted
    run_ctx = (
        record.mlflow_run(s.cfg, s.init_from, p.run_id, s.meta, s.resumed, nested, run_name, s.tags, stop_exc)
        if s.info.main
        else None
    )
    with run_ctx or contextlib.nullcontext(None) as active, StopSignals() as signals:
        if active is not None:
            p.run_id = active.info.run_id
            run_id = p.run_id  # another rank failed: this run is FAILED, not left RUNNING by the hard exit
            watch.on_peer_failure = lambda message: tracking.update_run(run_id, {tracking.TAG_ERROR: message}, "FAILED")
        local = s.out_dir / METRICS_FILE if s.info.main else None
        with tracking.MetricLogger(p.run_id if s.info.main else None, local) as metrics:
            try:
                _loop(s, p, metrics, signals, stop_exc)
            except BaseException:
                s.best_writer.wait(raise_error=False)  # the last good best model stays whole on disk
                raise
            finally:
                LinearCrossEntropy.release()  # the output layer's CPU buffer is not kept past training
            s.best_writer.wait()
            on_ends(s.hooks, _moment(s, p, metrics, evaluated=False))
        if s.info.main:
            record.final_artifacts(s.out_dir, s.ckpt_dir, p.train_curve, p.val_curve, p.best_iter)
            if s.cfg.register_as and s.ckpt_dir.is_dir():
                record.register(s.ckpt_dir, p.run_id, s.cfg.register_as, s.cfg.register_alias)
    return FinetuneResult(
        p.best_val, p.best_iter, p.it, p.tokens_seen, s.out_dir, s.ckpt_dir, p.run_id, list(p.val_curve)
    )


def _loop(
    s: RunSetup, p: Progress, metrics: tracking.MetricLogger, signals: StopSignals, stop_exc: list[BaseException]
) -> None:
    """Evaluate when due, let the hooks look, step, log, save when due; until max_iters or a stop signal."""
    cfg, main = s.cfg, s.info.main
    schedule = SaveSchedule(cfg, p, s.device if s.sharded else None)
    # the ranks that take part in a save: under FSDP all (gathering the full weights is a collective)
    saves = (main or s.sharded) and cfg.save_state
    bar = tqdm(total=cfg.max_iters, initial=p.it, desc="finetune", unit="it", disable=None if main else True)
    t_last = time.perf_counter()
    while True:
        lr = lr_at(cfg, p.it)
        evaluated = (p.it % cfg.eval_interval == 0 or p.it == cfg.max_iters) and p.it != p.last_eval_iter
        if evaluated:
            _evaluate(s, p, lr, metrics, stop_exc)
            if main:
                bar.set_postfix(val=f"{p.val_curve[-1][1]:.4f}", best=f"{p.best_val:.4f}")
        if on_steps(s.hooks, _moment(s, p, metrics, evaluated)) or evaluated:
            t_last = time.perf_counter()  # tokens/s measures training, not evaluation or claim scoring
        if p.it >= cfg.max_iters:
            break
        step_loss, stop = _step(s, p, lr, signals.signum is not None)
        bar.update(1)
        now = time.perf_counter()
        dt, t_last = now - t_last, now
        if main and (p.it % cfg.log_interval == 0 or p.it == cfg.max_iters):
            metrics.log(_step_metrics(s, p, step_loss, lr, dt, now), step=p.it)
        if saves and (stop or schedule.due(p.it)):
            saving.save_state(s, p)
            metrics.flush()  # the store holds every point up to the state a resume would continue from
            schedule.done(p)
        if stop:
            bar.close()
            distributed.all_sum([0.0], s.device)  # every rank waits for rank 0's save before exiting
            raise _preempted(s, p, signals.signum or signal.SIGTERM, stop_exc)
    bar.close()
    if saves and schedule.changed_since_save(p):  # the end (and its final evaluation)
        saving.save_state(s, p)


def _evaluate(
    s: RunSetup, p: Progress, lr: float, metrics: tracking.MetricLogger, stop_exc: list[BaseException]
) -> None:
    """Every rank: the losses, the best so far, the best model's write, metrics and hooks (rank 0); stops
    every rank when a hook asked to (its exception is re-raised on rank 0)."""
    train_loss, val_loss, by_source = _losses(s, p)
    save = _record_best(s, p, val_loss)
    weights = saving.best_weights(s) if save else None  # FSDP: every rank gathers, rank 0 writes
    if s.info.main:
        if save:
            saving.save_best(s, p, val_loss, weights)
        best = p.best_val if save else None
        metrics.log(record.eval_metrics(train_loss, val_loss, p.tokens_seen, by_source, best), step=p.it)
        try:
            on_evals(s.hooks, EvalResult(p.it, p.tokens_seen, train_loss, val_loss, lr), s.best_writer.wait)
        except BaseException as exc:  # noqa: B036 - any stop request, re-raised below on this rank
            stop_exc.append(exc)
    if distributed.broadcast_flag(bool(stop_exc), s.device):
        raise stop_exc[0] if stop_exc else _Stop()


def _losses(s: RunSetup, p: Progress) -> tuple[float, float, dict[str, float]]:
    """(train, val, per-source val) loss on the fixed windows; a non-finite one stops training naming the
    iteration. `val` is the loss that picks the best model: val.bin's, or the `--select-on` source's."""
    plain = getattr(s.objective, "module", s.objective)  # no DDP hooks in evaluation
    train_loss = estimate(plain, s.train_batches, s.fixed["train"], s.info, s.autocast, s.sharded)
    val_loss = estimate(plain, s.val_batches, s.fixed["val"], s.info, s.autocast, s.sharded)
    by_source = {
        name: estimate(plain, batches, starts, s.info, s.autocast, s.sharded)
        for name, (batches, starts) in s.source_val.items()
    }
    if s.cfg.select_on != "val":
        by_source["all"], val_loss = val_loss, by_source[s.cfg.select_on]
    if not (math.isfinite(val_loss) and math.isfinite(train_loss)):
        raise NonFiniteLossError(_nonfinite_message("evaluation", p.it, val_loss, p.best_iter, s.ckpt_dir))
    p.last_eval_iter = p.it
    p.val_curve.append((p.tokens_seen, val_loss))
    return train_loss, val_loss, by_source


def _record_best(s: RunSetup, p: Progress, val_loss: float) -> bool:
    """Every rank: keep the best loss and iteration; True when this evaluation writes the best model (it
    improved, or --always-save-checkpoint). The losses are all-reduced, so all ranks decide alike."""
    improved = val_loss < p.best_val
    if improved:
        p.best_val, p.best_iter = val_loss, p.it
    return improved or s.cfg.always_save_checkpoint


def _moment(s: RunSetup, p: Progress, metrics: tracking.MetricLogger, evaluated: bool) -> Moment:
    return Moment(
        iter=p.it,
        tokens_seen=p.tokens_seen,
        evaluated=evaluated,
        last=p.it == s.cfg.max_iters,
        model=getattr(s.model, "_orig_mod", s.model),
        log=functools.partial(metrics.log, step=p.it),
    )


def _step(s: RunSetup, p: Progress, lr: float, stop_asked: bool) -> tuple[float, bool]:
    """One optimizer step of `accum` micro-batches per rank. Returns (mean loss over ranks, whether any rank
    was asked to stop); both travel in the one all-reduce of the step."""
    for group in s.optimizer.param_groups:
        group["lr"] = lr
    # Batches and dropout are re-seeded from (seed, rank, iteration): the iteration is the data position.
    seeds = np.random.SeedSequence((s.cfg.seed, s.info.rank, p.it))
    s.train_batches.rng = np.random.default_rng(seeds)
    torch.manual_seed(int(seeds.generate_state(1)[0]))
    local_loss = accumulate(s.objective, s.train_batches, s.accum, s.autocast, s.scaler)
    step_loss, stops = distributed.all_sum([local_loss, float(stop_asked)], s.device)
    step_loss /= s.info.world_size
    if not math.isfinite(step_loss):
        s.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(_nonfinite_message("training", p.it, step_loss, p.best_iter, s.ckpt_dir))
    s.best_writer.before_update()  # the best model's snapshot, taken during this step's passes, is complete
    update(s.model, s.optimizer, s.scaler, s.cfg.grad_clip)
    p.it += 1
    p.train_curve.append((p.tokens_seen, step_loss))
    return step_loss, stops > 0


def _step_metrics(s: RunSetup, p: Progress, loss: float, lr: float, dt: float, now: float) -> dict[str, float]:
    tokens_per_s = s.tokens_per_iter / dt
    total = (p.it - p.start_iter) * s.tokens_per_iter / (now - p.started)
    mfu = s.flops_token * tokens_per_s / (s.peak * s.info.world_size) if s.peak else None
    return record.step_metrics(loss, lr, tokens_per_s, total, mfu, s.device)


def _preempted(s: RunSetup, p: Progress, signum: int, stop_exc: list[BaseException]) -> Preempted:
    name = signal.Signals(signum).name
    exc = Preempted(f"stopped by {name} at iteration {p.it}; {saving.resume_hint(s, p)}", signum)
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
