"""The token bins `prepare` writes: DIR/train.bin and DIR/val.bin, token ids, messages separated by EOT (EOS).

The ids are meta.json's `dtype`: uint16 for GPT-2 and any vocabulary of up to 65,536 ids, uint32 beyond.

Read memmapped by `finetune` (random training windows, fixed validation windows), `score` (perplexity on the
same fixed windows) and `tune`. The fixed windows are drawn with a constant seed, so every evaluation of every
run on the same data folder sees the same tokens and loss curves of different runs are comparable.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np

from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.errors import FakegptError

SPLITS = ("train", "val")
DTYPES = ("uint16", "uint32")
# Constant, independent of the run's seed: the validation windows must be the same for every run.
EVAL_SEED = 20240521


def bin_dtype(data_dir: str | Path) -> np.dtype:
    """The dtype of DIR's bins, from DIR/meta.json; a folder without one holds uint16 GPT-2 ids (what fakegpt
    wrote before meta.json recorded anything else)."""
    if not (Path(data_dir) / META_FILE).is_file():
        return np.dtype(np.uint16)
    name = DatasetMeta.load(data_dir).dtype
    if name not in DTYPES:
        raise FakegptError(f"{Path(data_dir) / META_FILE}: dtype {name!r} is not one of {', '.join(DTYPES)}")
    return np.dtype(name)


def open_bin(data_dir: str | Path, split: str, block_size: int, dtype: np.dtype | None = None) -> np.memmap:
    """Memmap DIR/<split>.bin as `dtype` (default: meta.json's), checking that it holds at least one window of
    block_size + 1 tokens."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise FakegptError(f"{path}: no such file (run `fakegpt prepare` to write train.bin and val.bin)")
    if path.stat().st_size == 0:  # np.memmap cannot map an empty file
        raise FakegptError(f"{path}: empty (0 tokens); prepare more data or a non-empty validation split")
    dtype = bin_dtype(data_dir) if dtype is None else np.dtype(dtype)
    if path.stat().st_size % dtype.itemsize:
        raise FakegptError(
            f"{path}: {path.stat().st_size} bytes, not a whole number of {dtype.name} token ids (meta.json's dtype)"
        )
    data = np.memmap(path, dtype=dtype, mode="r")
    if len(data) < block_size + 1:
        raise FakegptError(
            f"{path}: {len(data)} tokens, fewer than one window of block_size + 1 = {block_size + 1}; "
            "lower --block-size or prepare more data"
        )
    return data


def eval_starts(n_tokens: int, block_size: int, n_windows: int) -> np.ndarray:
    """The fixed window starts used for every evaluation of a split (same for every run on the data)."""
    rng = np.random.default_rng(EVAL_SEED)
    return rng.integers(0, n_tokens - block_size, size=n_windows)


def check_vocab(data: np.ndarray, vocab_size: int, path: str | Path) -> None:
    """Every token id in `data` (a memmapped bin) is a row of a model with `vocab_size` embeddings."""
    top = int(data.max()) if len(data) else 0
    if top >= vocab_size:
        raise FakegptError(
            f"{path}: token id {top} is beyond the model's vocabulary ({vocab_size} ids); "
            "the bins were made with another tokenizer or are damaged"
        )


def fingerprint(data_dir: str | Path) -> dict[str, str]:
    """sha256 and token count of each bin present: what identifies a prepared dataset in MLflow's lineage.

    Two folders with the same fingerprint hold the same tokens, whatever their names or where they were made.
    """
    out: dict[str, str] = {}
    itemsize = bin_dtype(data_dir).itemsize
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.bin"
        if not path.is_file():  # score reads val.bin alone
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
        out[f"{split}_sha256"] = digest.hexdigest()
        out[f"{split}_tokens"] = str(path.stat().st_size // itemsize)
    joined = "".join(out.get(f"{split}_sha256", "") for split in SPLITS)
    out["digest"] = hashlib.sha256(joined.encode()).hexdigest()[:16]
    return out


def source_val_file(name: str) -> str:
    """The file of a mixture source's held-out messages: val_<name>.bin (name made safe for a file name)."""
    return "val_" + re.sub(r"[^\w.-]", "_", name) + ".bin"
