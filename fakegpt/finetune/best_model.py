"""Writing the best model (OUT/checkpoint/) without stopping training: a CPU snapshot, then a background write.

An improving evaluation copies the weights into a CPU buffer allocated once (pinned on CUDA, so the copy is one
fast device-to-host transfer) and a background thread writes the HF folder from it (`save_checkpoint`,
atomically) while training goes on. Only the copy is paid on the training thread: for gpt2-xl 6.2 GB of
weights, a fraction of a second, instead of seconds of disk writes at every improvement. A new snapshot
first waits for the write in flight. The buffer costs one more copy of the weights in host memory; with
`background_save=false` the write happens before training continues, and no buffer is kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fakegpt.models import loading
from fakegpt.models.checkpoint import TrainingInfo

log = logging.getLogger(__name__)


class BestModelWriter:
    """Writes the best model as an HF folder, from a host copy of the weights, in a background thread
    (or inline); `wait` blocks until the last write is on disk and re-raises its error."""

    def __init__(self, background: bool = True):
        self.background = background
        self._buffer: dict[str, torch.Tensor] | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.copy_seconds = 0.0  # time the training thread spent on snapshots (for benchmarks)
        self.write_seconds = 0.0  # time spent writing folders (in the background, or inline)

    def submit(
        self,
        model: Any,
        folder: str | Path,
        info: TrainingInfo,
        weights: dict[str, torch.Tensor] | None = None,
        then: Callable[[], Any] | None = None,
    ) -> None:
        """Save `model`'s current weights with `info` as FOLDER (in the background when enabled).

        `weights`: save these tensors (with `model`'s configuration) instead of `model.state_dict()`: LoRA's
        merged weights. `then`: called after the folder is written, in the same thread (LoRA's adapter folder)."""
        self.wait()
        if not self.background:
            self._write(model, Path(folder), info, None if weights is None else dict(weights), then)
            self.wait()
            return
        started = time.perf_counter()
        snapshot = self._snapshot(model, weights)
        self.copy_seconds += time.perf_counter() - started
        self._thread = threading.Thread(
            target=self._write, args=(model, Path(folder), info, snapshot, then), name="fakegpt-best-model"
        )
        self._thread.start()

    def _snapshot(self, model: Any, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        weights = model.state_dict() if weights is None else weights
        if self._buffer is None:
            pin = any(v.is_cuda for v in weights.values())
            by_storage: dict[int, torch.Tensor] = {}
            self._buffer = {}
            for name, value in weights.items():  # tied weights (wte / lm_head) stay one tensor, as in the model
                ptr = value.data_ptr()
                if ptr not in by_storage:
                    by_storage[ptr] = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pin)
                self._buffer[name] = by_storage[ptr]
        copied: set[int] = set()
        for name, value in weights.items():
            target = self._buffer[name]
            if target.data_ptr() not in copied:
                target.copy_(value.detach(), non_blocking=True)
                copied.add(target.data_ptr())
        if any(v.is_cuda for v in weights.values()):
            torch.cuda.synchronize()
        return self._buffer

    def _write(
        self, model: Any, folder: Path, info: TrainingInfo, snapshot: dict | None, then: Callable[[], Any] | None
    ) -> None:
        started = time.perf_counter()
        try:
            # a shallow copy: save_pretrained empties the dict it is given as it writes the shards
            loading.save_checkpoint(model, folder, info, state_dict=None if snapshot is None else dict(snapshot))
            if then is not None:
                then()
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._error = exc
        finally:
            self.write_seconds += time.perf_counter() - started

    def wait(self, raise_error: bool = True) -> None:
        """Block until the write in flight is on disk; re-raise its error (a full disk names the file)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            if raise_error:
                raise error
            log.error("writing the best model failed too: %s", error)
