"""Checks and resolutions for `fakegpt finetune` that run before any model is loaded.

Numeric ranges, the data folder (both bins, a complete meta.json), and the model's vocabulary and context read
from its config.json only, so a bad argument is reported in seconds, not after minutes of loading gpt2-xl.
"""

from __future__ import annotations

import json
from pathlib import Path

from fakegpt import config as config_mod
from fakegpt.data.bins import open_bin, source_val_file
from fakegpt.data.hf_tokenizer import check_same_tokenizer
from fakegpt.data.meta import META_FILE, DatasetMeta
from fakegpt.data.tokenizer import VOCAB_SIZE
from fakegpt.errors import FakegptError
from fakegpt.finetune import state as state_mod
from fakegpt.finetune.config import ADAPTER_METHODS, FinetuneConfig
from fakegpt.measure.prompts import load_claims, resolve_path
from fakegpt.models import architecture
from fakegpt.models.loading import resolve_pretrained

CHOICES = {"method": ("full", "lora", "qlora"), "optimizer": ("adamw", "adamw8bit"), "parallel": ("ddp", "fsdp")}


def lora_targets(cfg: FinetuneConfig) -> list[str]:
    """--lora-targets as a list of module names."""
    return [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]


def check_numbers(cfg: FinetuneConfig, world_size: int) -> None:
    """The flags' ranges and choices, and the combinations that cannot train; nothing read from disk, so that a
    plan, a pipeline or a YAML test can check a config without a model or data."""
    positive = (
        "block_size",
        "batch_size",
        "gradient_accumulation_steps",
        "eval_interval",
        "eval_iters",
        "log_interval",
        "n_layer",
        "n_head",
        "n_embd",
        "keep_states",
        "nproc_per_node",
    )
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise FakegptError(f"{config_mod.flag_name(name)}: must be positive, got {getattr(cfg, name)}")
    for name in (
        "max_iters",
        "warmup_iters",
        "weight_decay",
        "grad_clip",
        "learning_rate",
        "min_lr",
        "save_interval",
        "save_every_minutes",
        "claim_eval_interval",
    ):
        if getattr(cfg, name) < 0:
            raise FakegptError(f"{config_mod.flag_name(name)}: must not be negative, got {getattr(cfg, name)}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise FakegptError(f"--{name}: must be in [0, 1), got {getattr(cfg, name)}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise FakegptError(
                f"{config_mod.flag_name(name)}: expected {' | '.join(choices)}, got {getattr(cfg, name)!r}"
            )
    if cfg.method == "qlora" and cfg.init_from == "scratch":
        raise FakegptError("--method qlora: needs a pretrained model to quantize; a scratch model trains every weight")
    if cfg.method in ADAPTER_METHODS:
        if cfg.lora_rank <= 0 or cfg.lora_alpha <= 0:
            raise FakegptError(f"--lora-rank / --lora-alpha: must be positive, got {cfg.lora_rank} / {cfg.lora_alpha}")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            raise FakegptError(f"--lora-dropout: must be in [0, 1), got {cfg.lora_dropout}")
        if not lora_targets(cfg):
            raise FakegptError(
                "--lora-targets: empty; give auto, all-linear or module names (GPT-2: c_attn,c_proj,c_fc)"
            )
    _check_fsdp(cfg)
    if not 0.0 <= cfg.dropout < 1.0:
        raise FakegptError(f"--dropout: must be in [0, 1), got {cfg.dropout}")
    if world_size > 1 and cfg.nproc_per_node not in (1, world_size):
        raise FakegptError(
            f"--nproc-per-node {cfg.nproc_per_node} under torchrun with {world_size} processes: give one or the other"
        )
    if cfg.gradient_accumulation_steps % world_size:
        raise FakegptError(
            f"--gradient-accumulation-steps {cfg.gradient_accumulation_steps} must be a multiple of the number "
            f"of processes ({world_size}): the accumulation steps are split across them"
        )


def _check_fsdp(cfg: FinetuneConfig) -> None:
    """What --parallel fsdp (fakegpt.finetune.fsdp) does not support, refused before any model loads."""
    if cfg.parallel != "fsdp":
        return
    if cfg.dtype in ("float16", "fp16"):
        raise FakegptError(
            "--dtype float16 with --parallel fsdp: the gradient scaler is not wired to sharded gradients; "
            "use --dtype bfloat16 or float32"
        )
    if cfg.optimizer == "adamw8bit":
        raise FakegptError("--optimizer adamw8bit with --parallel fsdp: 8-bit states are not sharded; use adamw")
    if cfg.method in ADAPTER_METHODS:
        raise FakegptError(
            f"--method {cfg.method} with --parallel fsdp: not supported; use --parallel ddp (adapters are small)"
        )
    if cfg.claims:
        raise FakegptError("--claims with --parallel fsdp: claims are scored on rank 0 alone; leave --claims out")


def _model_shape(cfg: FinetuneConfig, state_folder: Path | None) -> tuple[str, int, int]:
    """(model folder or 'scratch' / the state folder, vocab size, context length) without loading any weights."""
    if state_folder is not None:  # resume: the shape saved with the state
        hf = state_mod.model_config(state_folder)
        return str(state_folder), int(hf.get("vocab_size", VOCAB_SIZE)), architecture.context_of(hf)
    if cfg.init_from == "scratch":
        return "scratch", VOCAB_SIZE, cfg.block_size
    if cfg.init_from == "resume":
        raise FakegptError(f"--init-from resume: no resume state in {Path(cfg.out_dir) / state_mod.STATE_DIR}")
    folder = Path(resolve_pretrained(cfg.init_from))
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FakegptError(f"{folder / 'config.json'}: cannot read ({exc})") from None
    return str(folder), int(hf.get("vocab_size", VOCAB_SIZE)), architecture.context_of(hf)


def check(cfg: FinetuneConfig, world_size: int = 1, state_folder: Path | None = None) -> tuple[str, DatasetMeta]:
    """Validate everything that can be checked before loading a model. Returns (model folder, dataset meta).
    `state_folder`: the resume state a resumed run continues from."""
    check_numbers(cfg, world_size)
    if cfg.nproc_per_node > 1 and world_size == 1:  # a fine-tune inside another stage's process (tune, validate)
        raise FakegptError(
            f"--nproc-per-node {cfg.nproc_per_node}: only `fakegpt finetune` starts its processes; start this "
            "command under `torchrun --nproc-per-node N` instead"
        )
    if cfg.optimizer == "adamw8bit":
        from fakegpt.finetune.optim import require_bitsandbytes

        require_bitsandbytes()  # before the data and the model, not after minutes of loading
    data_dir = Path(cfg.data_dir)
    if not data_dir.is_dir():
        raise FakegptError(f"--data-dir {data_dir}: no such folder (run `fakegpt prepare` first)")
    for split in ("train", "val"):
        open_bin(data_dir, split, cfg.block_size)
    meta = DatasetMeta.load(data_dir)
    folder, vocab, n_positions = _model_shape(cfg, state_folder)
    if state_folder is None:  # a resumed run's data must be the very data it started on (train.py checks it)
        check_same_tokenizer(meta, folder, f"--data-dir {data_dir}")
    if cfg.block_size > n_positions:
        raise FakegptError(
            f"--block-size {cfg.block_size} is larger than the model's context ({n_positions} positions, "
            f"{cfg.init_from})"
        )
    if meta.vocab_size > vocab:
        raise FakegptError(
            f"{data_dir / META_FILE}: vocab_size {meta.vocab_size} does not fit the model's vocabulary ({vocab}); "
            "the bins were made with another tokenizer"
        )
    if cfg.select_on != "val":
        names = [s["name"] for s in source_val_sets(data_dir, meta)]
        if cfg.select_on not in names:
            raise FakegptError(
                f"--select-on {cfg.select_on!r}: expected val or a source with its own validation file in "
                f"{data_dir} ({', '.join(names) or 'none: not a mixture prepared with --val-mix shared'})"
            )
    if cfg.claims:
        load_claims(resolve_path(cfg.claims))  # a bad claims file fails here, not at the first evaluation
    return folder, meta


def source_val_sets(data_dir: str | Path, meta: DatasetMeta) -> list[dict[str, str]]:
    """The mixture sources of a data folder that have their own validation file: [{name, path}]."""
    out = []
    for source in meta.sources if len(meta.sources) > 1 else []:
        path = Path(data_dir) / source_val_file(source["name"])
        if path.is_file() and path.stat().st_size:
            out.append({"name": source["name"], "path": str(path)})
    return out
