"""Training and validation batches: random windows of block_size + 1 tokens from memmapped token bins.

`prepare` writes DIR/train.bin and DIR/val.bin (token ids, messages separated by EOT) and DIR/meta.json;
`fakegpt.data.bins.open_bin` maps them with meta.json's dtype (uint16, or uint32 for large vocabularies), and
every window is widened to int64 here.
Training windows start anywhere (a fresh random start per row, seeded per rank); validation uses one fixed
set of windows drawn with a constant seed, so every evaluation of every run sees the same tokens and loss
curves from different runs (seeds, learning rates, mixtures of the same data folder) are comparable.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


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
        """(x, y) for windows starting at `starts`: shapes (B, T), y shifted by one token, on the device."""
        t = self.block_size
        rows = np.stack([np.asarray(self.data[s : s + t + 1]) for s in starts]).astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(rows)
        if self.pin:
            xy = xy.pin_memory()
        xy = xy.to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random micro-batch from this rank's generator."""
        starts = self.rng.integers(0, len(self.data) - self.block_size, size=self.batch_size)
        return self.windows(starts)

    def state(self) -> dict[str, Any]:
        """The random generator's state (to continue the same stream)."""
        return dict(self.rng.bit_generator.state)  # numpy types it as a Mapping; it is a new dict each time

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue the random stream from `state`."""
        self.rng.bit_generator.state = state
