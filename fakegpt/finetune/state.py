"""The resume state of a fine-tune: one folder per save, written under a temporary name and renamed into place.

OUT/state/iter-NNNNNNN/ holds
- `model.pt`      the weights at iteration N (a plain state dict; with --method lora only the adapter tensors,
                  the base model is loaded again from the run's init_from), or instead
  `model.safetensors` a hard link to the best model's weights file when that was written from these very
                  weights (the best model of iteration N: typically the end of a run whose last evaluation
                  improved): the same bytes are not written (and stored) twice, 6.2 GB at gpt2-xl,
- `optimizer.pt`  AdamW's state and, under float16, the gradient scaler's,
- `model_config.json` the HF model configuration (the shape to rebuild before loading the weights),
- `state.json`    the iteration, best loss/iteration, loss curves, MLflow run id, the run's identity, the full
                  resolved configuration, the data's meta.json and the size and CRC-32 of each file above.
Batches and dropout are re-seeded from (seed, rank, iteration) every iteration, so the iteration number is the
whole RNG and data position. Tensors are read back with `torch.load(weights_only=True)`; a truncated or damaged
file is a one-line error naming it. A killed write leaves only a `.iter-*.tmp` folder, removed at the next start
(`remove_leftovers`); the previous state stays whole. Only the newest `keep_states` folders are kept.

The best model (OUT/checkpoint/, HF format, weights only) is written separately, on improvement.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from fakegpt.contracts import from_versioned_dict, to_versioned_dict
from fakegpt.errors import FakegptError
from fakegpt.files import atomic_dir
from fakegpt.models.checkpoint import ADAPTER_DIR, CHECKPOINT_DIR, TrainingInfo
from fakegpt.models.checkpoint_io import DurableFile, crc32_of
from fakegpt.models.weights import WEIGHTS_NAME, WeightsFile

log = logging.getLogger(__name__)

STATE_DIR = "state"  # OUT/state/iter-NNNNNNN/
MODEL_FILE = "model.pt"
LINKED_MODEL_FILE = WEIGHTS_NAME  # the best model's own file, hard-linked (see the module docstring)
# GPT-2's tied output layer, left out of HF's safetensors (one tensor, two names); other architectures' tied
# names are put back from the model itself on resume (`architecture.fill_tied`)
TIED_KEYS = {"lm_head.weight": "transformer.wte.weight"}
OPTIMIZER_FILE = "optimizer.pt"
STATE_JSON = "state.json"
MODEL_CONFIG = "model_config.json"  # the model's HF config: the model is rebuilt from it, then given model.pt
_NAME = re.compile(r"^iter-(\d{7,})$")
RUN_UID_KEY = "run_uid"  # in training_info.json's extra keys: which run (across resumes) wrote the checkpoint


@dataclass
class ResumeInfo:
    """state.json: where a run stands, and everything needed to continue it with the same meaning."""

    SCHEMA: ClassVar[int] = 1
    NUMBERS: ClassVar[tuple[str, ...]] = ("iter", "best_iter")

    iter: int  # optimizer steps done; also the data position
    best_val_loss: float | None  # None before any evaluation (JSON has no infinity)
    best_iter: int  # -1 before any evaluation
    init_from: str  # the base model (hub name, folder or scratch), never "resume"
    run_id: str  # the MLflow run to continue ("" when there was none)
    run_uid: str  # this run's identity across resumes; the best model's training_info.json carries it too
    config: dict[str, Any]  # the resolved FinetuneConfig
    data: dict[str, Any]  # the data folder's meta.json
    files: dict[str, int]  # file name -> size in bytes, to detect truncation before unpickling
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> CRC-32 (hex): damage inside a file
    val_curve: list[list[float]] = field(default_factory=list)  # (tokens_seen, val_loss)
    train_curve: list[list[float]] = field(default_factory=list)  # (tokens_seen, train_loss)
    rng: str = "batches and dropout re-seeded from (seed, rank, iter)"
    schema_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def best(self) -> float:
        """The best validation loss so far (inf before the first evaluation)."""
        return math.inf if self.best_val_loss is None else float(self.best_val_loss)


def root(out_dir: str | Path) -> Path:
    """OUT/state/: where resume states live."""
    return Path(out_dir) / STATE_DIR


def folder_for(out_dir: str | Path, it: int) -> Path:
    """The state folder of iteration `it`: OUT/state/iter-NNNNNNN."""
    return root(out_dir) / f"iter-{it:07d}"


def saved(out_dir: str | Path) -> list[Path]:
    """The complete state folders in OUT/state/, oldest first (temporary folders of a write are not listed)."""
    base = root(out_dir)
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest(out_dir: str | Path) -> Path | None:
    """The newest complete state folder, or None."""
    states = saved(out_dir)
    return states[-1] if states else None


def remove_leftovers(out_dir: str | Path) -> list[Path]:
    """Delete what a killed write left behind: temporary state folders and checkpoint swaps. A checkpoint/
    lost between the two renames of its swap is restored from the old copy. Returns what was removed."""
    out = Path(out_dir)
    removed: list[Path] = []
    candidates = [*root(out).glob(".*.tmp"), *root(out).glob(".*.old")]
    for name in (CHECKPOINT_DIR, ADAPTER_DIR):  # the best model, and LoRA's adapters beside it
        ckpt, old = out / name, out / f".{name}.old"
        if old.is_dir() and not ckpt.exists():
            os.replace(old, ckpt)  # killed between "checkpoint -> .old" and ".tmp -> checkpoint"
            log.warning("restored %s from %s (a write of the best model was interrupted)", ckpt, old)
        candidates += [*out.glob(f".{name}.*.tmp"), old]
    for path in candidates:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(path)
    if removed:
        log.info("removed %d leftover temporary file(s) of an interrupted write: %s", len(removed), removed[0].name)
    return removed


def remove_all(out_dir: str | Path) -> int:
    """Delete every resume state in OUT (a fresh run in a folder that held another run). Returns how many."""
    states = saved(out_dir)
    for path in states:
        shutil.rmtree(path, ignore_errors=True)
    return len(states)


def _save_synced(obj: Any, path: Path) -> int:
    """torch.save to `path`, written back as it goes and fsync'd; returns the file's CRC-32."""
    import torch.serialization

    # the state keeps one CRC-32 of each whole file; torch's own per-record CRC would be a second pass over
    # gigabytes on the writing thread (0.7 s for a gpt2-medium AdamW state)
    torch_crc = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with DurableFile(path) as fh:
            torch.save(obj, fh)
    finally:
        torch.serialization.set_crc32_options(torch_crc)
    return fh.crc


def _link(weights: WeightsFile, target: Path) -> bool:
    """Hard-link `weights` as `target`; False (the caller writes the weights) when it is gone, changed or the
    file system cannot link."""
    try:
        if weights.path.stat().st_size != weights.size:
            return False
        os.link(weights.path, target)
        return True
    except OSError as exc:
        log.debug("not linking %s into the resume state (%s); writing the weights", weights.path, exc)
        return False


def write(
    out_dir: str | Path,
    info: ResumeInfo,
    model_state: dict,
    optimizer_state: dict,
    model_config: dict[str, Any],
    keep: int = 1,
    weights_file: Callable[[], WeightsFile | None] | None = None,
) -> Path:
    """Write OUT/state/iter-N/ as one unit (temporary folder, fsync, rename), then keep only the newest `keep`.

    `weights_file`: called once the optimizer state is written (meanwhile a best-model write in flight may
    finish); when it returns a durable safetensors file of exactly `model_state` (the best model of this
    iteration), that file is hard-linked instead of writing the weights again."""
    final = folder_for(out_dir, info.iter)
    with atomic_dir(final) as tmp:
        (tmp / MODEL_CONFIG).write_text(json.dumps(model_config, indent=1) + "\n", encoding="utf-8")
        crcs = {OPTIMIZER_FILE: _save_synced(optimizer_state, tmp / OPTIMIZER_FILE)}
        linked = weights_file() if weights_file is not None else None
        if linked is not None and _link(linked, tmp / LINKED_MODEL_FILE):
            crcs[LINKED_MODEL_FILE] = linked.crc32
        else:
            crcs[MODEL_FILE] = _save_synced(model_state, tmp / MODEL_FILE)
        info.files = {name: (tmp / name).stat().st_size for name in crcs}
        info.checksums = {name: f"{crc:08x}" for name, crc in crcs.items()}
        text = json.dumps(to_versioned_dict(info), indent=1, ensure_ascii=False, default=str) + "\n"
        with open(tmp / STATE_JSON, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    for old in saved(out_dir)[: -max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_info(folder: str | Path) -> ResumeInfo:
    """state.json of a state folder, checked against the sizes of the files it lists."""
    folder = Path(folder)
    path = folder / STATE_JSON
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FakegptError(f"{path}: no such file; the resume state is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FakegptError(f"{path}: damaged resume state, cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise FakegptError(f"{path}: damaged resume state (expected a JSON object)")
    info = from_versioned_dict(ResumeInfo, data, str(path))
    for name in (_model_file(info), OPTIMIZER_FILE):
        file = folder / name
        size = file.stat().st_size if file.is_file() else None
        if size is None or size != info.files.get(name):
            raise FakegptError(
                f"{file}: damaged resume state ({'missing' if size is None else f'{size} bytes'}, "
                f"{info.files.get(name)} expected); delete {folder} to resume from an older state, if one is kept"
            )
    if info.iter < 0 or info.best_iter > info.iter:
        raise FakegptError(f"{path}: inconsistent (best iteration {info.best_iter} after iteration {info.iter})")
    return info


def _model_file(info: ResumeInfo) -> str:
    """The weights' file name in a state: model.pt, or the linked model.safetensors."""
    return LINKED_MODEL_FILE if LINKED_MODEL_FILE in info.files else MODEL_FILE


def model_config(folder: str | Path) -> dict[str, Any]:
    """The HF model config saved with a resume state; damaged or missing: one-line error naming it."""
    path = Path(folder) / MODEL_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FakegptError(f"{path}: damaged resume state, cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise FakegptError(f"{path}: damaged resume state (expected a JSON object)")
    return data


def load_tensors(folder: str | Path) -> tuple[dict, dict]:
    """(model state dict, optimizer payload) of a state folder, unpickled with weights_only=True on the CPU."""
    import torch

    info = read_info(folder)
    out = []
    for name in (_model_file(info), OPTIMIZER_FILE):
        path = Path(folder) / name
        expected = info.checksums.get(name)
        if expected is not None and f"{crc32_of(path):08x}" != expected:
            raise FakegptError(f"{path}: damaged resume state (CRC-32 differs from the one written with it)")
        try:
            if name == LINKED_MODEL_FILE:
                from safetensors.torch import load_file

                obj = load_file(str(path), device="cpu")
                for tied, source in TIED_KEYS.items():  # the tied output layer is the embedding, as in the model
                    if tied not in obj and source in obj:
                        obj[tied] = obj[source]
            else:
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # zip/unpickling/header errors of many types: one line naming the file
            text = str(exc).strip().splitlines()
            raise FakegptError(f"{path}: damaged resume state ({text[0] if text else type(exc).__name__})") from None
        if not isinstance(obj, dict):
            raise FakegptError(f"{path}: damaged resume state (expected a state dict)")
        out.append(obj)
    return out[0], out[1]


def cross_check(info: ResumeInfo, folder: Path, out_dir: str | Path) -> TrainingInfo | None:
    """The best model in OUT/checkpoint/ must belong to this state's run and not be older than its best.

    The checkpoint may be newer than the state (an improvement saved after the last state write, before a
    kill); that is consistent, and returned so the caller keeps it as the best so far.
    """
    ckpt = Path(out_dir) / CHECKPOINT_DIR
    best = TrainingInfo.load(ckpt) if ckpt.is_dir() else None
    if best is None:
        if info.best_iter >= 0:
            raise FakegptError(
                f"{ckpt}: missing, but {folder / STATE_JSON} records a best model at iteration {info.best_iter}"
            )
        return None
    uid = best.extra.get(RUN_UID_KEY)
    if uid and info.run_uid and uid != info.run_uid:
        raise FakegptError(
            f"{ckpt}: written by another run than {folder} ({RUN_UID_KEY} {uid} != {info.run_uid}); "
            "the best model and the resume state do not belong together"
        )
    if best.iter < info.best_iter:
        raise FakegptError(
            f"{ckpt}: holds iteration {best.iter}, older than the best iteration {info.best_iter} recorded in "
            f"{folder / STATE_JSON}; the best model and the resume state do not belong together"
        )
    return best
