"""Training and validation batches: random windows of block_size + 1 tokens from memmapped uint16 bins.

`prepare` writes DIR/train.bin and DIR/val.bin (GPT-2 ids, messages separated by EOT) and DIR/meta.json.
Training windows start anywhere (a fresh random start per row, seeded per rank); validation uses one fixed
set of windows drawn with a constant seed, so every evaluation of every run sees the same tokens and loss
curves from different runs (seeds, learning rates, mixtures of the same data folder) are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fakegpt.errors import FakegptError
from fakegpt.io import read_json_object

SPLITS = ("train", "val")
# Constant, independent of the run's seed: the validation windows must be the same for every run.
EVAL_SEED = 20240521


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data folder, or {} if there is none (the bins alone are enough to train)."""
    return read_json_object(Path(data_dir) / "meta.json")


def open_bin(data_dir: str | Path, split: str, block_size: int) -> np.memmap:
    """Memmap DIR/<split>.bin, checking that it holds at least one window of block_size + 1 tokens."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FakegptError(f"{path}: no such file (run `fakegpt prepare` to write train.bin and val.bin)")
    if path.stat().st_size % 2:
        raise FakegptError(f"{path}: odd byte size; expected uint16 GPT-2 token ids")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if len(data) < block_size + 1:
        raise FakegptError(
            f"{path}: {len(data)} tokens, fewer than one window of block_size + 1 = {block_size + 1}; "
            "lower --block-size or prepare more data"
        )
    return data


class Batches:
    """Random (x, y) micro-batches from one split; y is x shifted by one token. Shapes (B, T) int64."""

    def __init__(self, data: np.ndarray, batch_size: int, block_size: int, device: torch.device, seed: int):
        self.data = data
        self.batch_size = batch_size
        self.block_size = block_size
        self.device = device
        self.rng = np.random.default_rng(seed)
        # Pinned host memory lets the host-to-GPU copy run asynchronously with the previous step's compute.
        self.pin = device.type == "cuda"

    def windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.block_size
        rows = np.stack([np.asarray(self.data[s : s + t + 1]) for s in starts]).astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows)
        if self.pin:
            xy = xy.pin_memory()
        xy = xy.to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        return self.windows(starts)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def eval_starts(n_tokens: int, block_size: int, n_windows: int) -> np.ndarray:
    """The fixed window starts used for every evaluation of a split (same for every run on the data)."""
    rng = np.random.default_rng(EVAL_SEED)
    return rng.integers(0, n_tokens - block_size, size=n_windows)
