"""When `finetune` writes its resume state: every `save_interval` iterations, every `save_every_minutes`, at the
end, and when SIGTERM (a cluster pre-empting the job) or SIGINT (Ctrl-C) asks it to stop.

The signal handlers only set a flag; the loop checks it after each optimizer step, saves, and stops, so a state
is never written from inside a half-done step. Under torchrun the flag travels with the step's all-reduce, so
every rank stops at the same iteration.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

from fakegpt.finetune import distributed
from fakegpt.finetune.config import FinetuneConfig

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
