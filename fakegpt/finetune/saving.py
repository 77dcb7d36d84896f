"""What `finetune` saves, and when.

The best model (`save_best`): OUT/checkpoint/, an HF folder with weights only, written in the background on
improvement. The resume state (`save_state`): OUT/state/iter-N/ (`fakegpt.finetune.state`), written every
`save_interval` iterations, every `save_every_minutes`, at the end, and when SIGTERM (a cluster pre-empting the
job) or SIGINT (Ctrl-C) asks it to stop.

The signal handlers only set a flag; the loop checks it after each optimizer step, saves, and stops, so a state
is never written from inside a half-done step. Under torchrun the flag travels with the step's all-reduce, so
every rank stops at the same iteration.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

from fakegpt import config as config_mod
from fakegpt.finetune import distributed, fsdp, lora
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.finetune.setup import Progress, RunSetup
from fakegpt.models.checkpoint import TrainingInfo

log = logging.getLogger(__name__)


class SaveSchedule:
    """When the resume state is due: every `save_interval` iterations and every `save_every_minutes`.

    With `shared_on` (a device; under FSDP, where every rank takes part in a save) rank 0's clock decides for
    all ranks: the time-based decision is broadcast (one tiny collective per step, only when saving by time).
    """

    def __init__(self, cfg: FinetuneConfig, t: Any, shared_on: Any = None):
        self.interval = cfg.save_interval
        self.seconds = cfg.save_every_minutes * 60
        self.enabled = cfg.save_state
        self.last_iter, self.last_eval = t.it, t.last_eval_iter  # what the state on disk (if any) holds
        self.last_time = time.monotonic()
        self.shared_on = shared_on

    def due(self, it: int) -> bool:
        """True when a resume state should be written at iteration `it` (by interval or by time)."""
        if not self.enabled or it == self.last_iter:
            return False
        by_iter = self.interval > 0 and it % self.interval == 0
        by_time = self.seconds > 0 and time.monotonic() - self.last_time >= self.seconds
        if self.shared_on is not None and self.seconds > 0:  # each rank's clock differs: rank 0's decides
            by_time = distributed.broadcast_flag(by_time, self.shared_on)
        return by_iter or by_time

    def done(self, t: Any) -> None:
        """Record that a state was just written (resets the interval and the clock)."""
        self.last_iter, self.last_eval, self.last_time = t.it, t.last_eval_iter, time.monotonic()

    def changed_since_save(self, t: Any) -> bool:
        """True when the run went on (or evaluated again) after the last state write."""
        return (t.it, t.last_eval_iter) != (self.last_iter, self.last_eval)


class StopSignals:
    """SIGTERM (cluster pre-emption) and SIGINT (Ctrl-C) ask the loop to save and stop after this iteration;
    a second SIGINT stops at once, without saving. Installed only in the main thread (signal's rule)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "%s: saving the resume state after this iteration, then stopping%s",
            signal.Signals(signum).name,
            " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else "",
        )

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def best_weights(s: RunSetup) -> dict | None:
    """Every rank: the full weights for the best model under FSDP (gathering is a collective), else None (a
    snapshot of the model is taken when it is written)."""
    return fsdp.full_model_state(s.model) if s.sharded else None


def save_best(s: RunSetup, p: Progress, val_loss: float, weights: dict | None = None) -> None:
    """Rank 0: OUT/checkpoint/, the model of this evaluation as an HF folder, weights only (no optimizer).
    `weights`: the full weights gathered under FSDP (`best_weights`)."""
    training_info = TrainingInfo(
        init_from=s.init_from,
        config=config_mod.to_dict(s.cfg),
        data=s.meta.to_dict(),
        iter=p.it,
        val_loss=val_loss,
        tokens_seen=p.tokens_seen,
        extra={state_mod.RUN_UID_KEY: s.run_uid},
    )
    if lora.is_lora(s.model):  # merged weights as a plain HF model, and the same iteration's adapters beside them
        adapter = lora.adapter_snapshot(s.model)
        s.best_writer.submit(
            lora.base_model(s.model),
            s.ckpt_dir,
            training_info,
            weights=lora.merged_state(s.model),
            then=lambda: lora.write_adapter(s.out_dir / lora.ADAPTER_DIR, adapter, training_info),
        )
        return
    # a host snapshot taken during the next step (or FSDP's gathered copy as it is); written in the background
    s.best_writer.submit(s.model, s.ckpt_dir, training_info, weights, owned=weights is not None)


def save_state(s: RunSetup, p: Progress) -> Path | None:
    """OUT/state/iter-N/: everything needed to continue exactly here (rank 0; under FSDP every rank gathers)."""
    unwrapped = getattr(s.model, "_orig_mod", s.model)
    if s.sharded:  # full (unsharded) weights and optimizer state, so any --parallel (or one process) resumes
        weights, optimizer_state = fsdp.full_state(s.model, s.optimizer)
        if not s.info.main:
            return None
    else:  # LoRA: the adapters only (the frozen base is loaded again from init_from on resume)
        weights = lora.adapter_state(unwrapped) if lora.is_lora(unwrapped) else unwrapped.state_dict()
        optimizer_state = s.optimizer.state_dict()
    info = state_mod.ResumeInfo(
        iter=p.it,
        best_val_loss=p.best_val if math.isfinite(p.best_val) else None,
        best_iter=p.best_iter,
        init_from=s.init_from,
        run_id=p.run_id or "",
        run_uid=s.run_uid,
        config=config_mod.to_dict(s.cfg),
        data=s.meta.to_dict(),
        files={},
        val_curve=[list(point) for point in p.val_curve],
        train_curve=[list(point) for point in p.train_curve],
        extra={"last_eval_iter": p.last_eval_iter, **lora.state_extra(unwrapped)},
    )
    payload = {
        "optimizer": optimizer_state,
        "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else {},
    }

    def best_model_file() -> state_mod.WeightsFile | None:
        """Called by the state writer after the optimizer file, which a best-model write in flight overlaps."""
        s.best_writer.wait()  # the best model on disk first: a state never records a best that is not written
        same = s.best_writer.last_weights
        # the best model of this very iteration (the end of a run whose last evaluation improved) holds these
        # weights, durable and checksummed: the state links its file instead of writing them again
        if same is not None and same[0] == p.it and not lora.is_lora(unwrapped):
            return same[1]
        return None

    config = unwrapped.config.to_dict()
    return state_mod.write(s.out_dir, info, weights, payload, config, s.cfg.keep_states, best_model_file)


def resume_hint(s: RunSetup, p: Progress) -> str:
    """Where a stopped run's resume state is and how to continue it (for the stop message)."""
    if not s.cfg.save_state:
        return "no resume state (--save-state false)"
    return (
        f"the resume state is in {state_mod.folder_for(s.out_dir, p.it)}; continue with "
        f"`fakegpt finetune --init-from resume --out-dir {s.out_dir}`"
    )
