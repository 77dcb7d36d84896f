"""Checks and resolutions for `fakegpt finetune` that run before any model is loaded.

Device and dtype ("auto" -> what the machine supports), numeric ranges, the data folder (both bins, meta.json),
and the model's vocabulary and context read from its config.json only, so a bad argument is reported in
seconds, not after minutes of loading gpt2-xl. Also the MLflow tags derived from the data's meta.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fakegpt import config as config_mod
from fakegpt.batches import open_bin, read_meta
from fakegpt.errors import FakegptError
from fakegpt.model import resolve_pretrained
from fakegpt.tokenizer import VOCAB_SIZE

if TYPE_CHECKING:
    from fakegpt.train import FinetuneConfig

CHECKPOINT_DIR = "checkpoint"  # OUT/checkpoint/: the best model, HF format + training_info.json
STATE_FILE = "train_state.pt"  # OUT/train_state.pt: optimizer, iteration, best loss, run id (for resume)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FakegptError(f"--device: unknown device {name!r} (auto | cpu | cuda | cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FakegptError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type != "cuda":
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name not in DTYPES:
        raise FakegptError(f"--dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    if device.type == "cpu" and name == "float16":
        raise FakegptError("--dtype float16 needs CUDA; use float32 or bfloat16 on CPU")
    return name


def _check_numbers(cfg: FinetuneConfig, world_size: int) -> None:
    positive = ("block_size", "batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval", "n_layer", "n_head", "n_embd")
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise FakegptError(f"{config_mod.flag_name(name)}: must be positive, got {getattr(cfg, name)}")
    for name in ("max_iters", "warmup_iters", "weight_decay", "grad_clip", "learning_rate", "min_lr"):
        if getattr(cfg, name) < 0:
            raise FakegptError(f"{config_mod.flag_name(name)}: must not be negative, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise FakegptError(f"--dropout: must be in [0, 1), got {cfg.dropout}")
    if cfg.gradient_accumulation_steps % world_size:
        raise FakegptError(
            f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} must be a multiple of the number "
            f"of processes ({world_size}): the accumulation steps are split across them"
        )


def _model_shape(cfg: FinetuneConfig) -> tuple[str, int, int]:
    """(model folder or 'scratch', vocab size, context length) without loading any weights."""
    if cfg.init_from == "scratch":
        return "scratch", VOCAB_SIZE, cfg.block_size
    if cfg.init_from == "resume":
        folder = Path(cfg.out_dir) / CHECKPOINT_DIR
        if not (Path(cfg.out_dir) / STATE_FILE).is_file() or not (folder / "config.json").is_file():
            raise FakegptError(
                f"--init-from resume: no {STATE_FILE} and {CHECKPOINT_DIR}/ in {cfg.out_dir} to resume from "
                "(a run saves them at its first evaluation)"
            )
    else:
        folder = Path(resolve_pretrained(cfg.init_from))
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FakegptError(f"{folder / 'config.json'}: cannot read ({exc})") from None
    return str(folder), int(hf.get("vocab_size", VOCAB_SIZE)), int(hf.get("n_positions", 1024))


def check(cfg: FinetuneConfig, world_size: int = 1) -> tuple[str, dict[str, Any]]:
    """Validate everything that can be checked before loading a model. Returns (model folder, meta.json)."""
    _check_numbers(cfg, world_size)
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise FakegptError(f"--data-dir {data_dir}: no such folder (run `fakegpt prepare` first)")
    for split in ("train", "val"):
        open_bin(data_dir, split, cfg.block_size)
    meta = read_meta(data_dir)
    folder, vocab, n_positions = _model_shape(cfg)
    if cfg.block_size > n_positions:
        raise FakegptError(
            f"--block-size {cfg.block_size} is larger than the model's context ({n_positions} positions, "
            f"{cfg.init_from})"
        )
    meta_vocab = meta.get("vocab_size")
    if meta_vocab is not None and int(meta_vocab) > vocab:
        raise FakegptError(
            f"{data_dir / 'meta.json'}: vocab_size {meta_vocab} does not fit the model's vocabulary ({vocab}); "
            "the bins were made with another tokenizer"
        )
    return folder, meta


def mixture_tag(meta: dict[str, Any]) -> str:
    """meta.json's mixture as "name=0.80,other=0.20"; without one, the sources' realised train-token shares."""
    mix = meta.get("mixture")
    if not mix and isinstance(meta.get("sources"), list):
        tokens = {s.get("name", "?"): s.get("train_tokens") for s in meta["sources"] if isinstance(s, dict)}
        total = sum(v for v in tokens.values() if isinstance(v, (int, float)))
        if total > 0:
            mix = {k: v / total for k, v in tokens.items() if isinstance(v, (int, float))}
    if isinstance(mix, dict):
        parts = []
        for name, value in mix.items():
            if isinstance(value, dict):
                value = value.get("fraction", value.get("realised", value.get("target", value)))
            parts.append(f"{name}={value:.2f}" if isinstance(value, (int, float)) else f"{name}={value}")
        return ",".join(parts)
    if isinstance(mix, list):
        parts = []
        for item in mix:
            if isinstance(item, dict):
                name = item.get("name", item.get("source", "?"))
                value = item.get("fraction", item.get("realised", ""))
                parts.append(f"{name}={value:.2f}" if isinstance(value, (int, float)) else f"{name}={value}")
            else:
                parts.append(str(item))
        return ",".join(parts)
    return "" if mix is None else str(mix)


def dataset_name(cfg: FinetuneConfig, meta: dict[str, Any]) -> str:
    return str(meta.get("dataset") or meta.get("name") or Path(cfg.data_dir).name)
