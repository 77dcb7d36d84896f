"""A fine-tune's MLflow record (rank 0): the run with its tags, parameters and dataset; the metrics of each
evaluation and logged step; the loss curve and the best model as artifacts at the end; the best model in the
registry when asked.

Kept apart from the training loop (`fakegpt.finetune.train`): what the record says is decided here, in one
place, and the loop only hands over what it did.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fakegpt import config as config_mod
from fakegpt import plots, tracking
from fakegpt.data import bins
from fakegpt.data.meta import DatasetMeta
from fakegpt.errors import one_line
from fakegpt.finetune import lora, resume
from fakegpt.finetune.config import FinetuneConfig
from fakegpt.models.checkpoint import CHECKPOINT_DIR, INFO_FILE
from fakegpt.models.loading import load_model, load_tokenizer

log = logging.getLogger(__name__)

CURVE_FILE = "loss_curve.png"


@contextlib.contextmanager
def mlflow_run(
    cfg: FinetuneConfig,
    init_from: str,
    run_id: str | None,
    meta: DatasetMeta,
    resumed: resume.Resumed | None,
    nested: bool,
    run_name: str | None,
    tags: dict | None,
    stop_exc: list[BaseException],
) -> Iterator[Any]:
    """The MLflow run: a resumed run continues its own `run_id` when this store has it. A deliberate stop (the
    first of `stop_exc`) is tagged as such, any other error with its one line."""
    all_tags = {
        tracking.TAG_MODEL: init_from,
        tracking.TAG_DATASET: meta.dataset or Path(cfg.data_dir).name,
        tracking.TAG_METHOD: cfg.method,
    }
    mix = meta.mixture_tag()
    if mix:
        all_tags[tracking.TAG_MIX] = mix
    if resumed is not None:
        all_tags[tracking.TAG_RESUMED_AT] = str(resumed.info.iter)
        if resumed.changes:
            all_tags[tracking.TAG_RESUME_CHANGES] = resume.describe(resumed.changes)
    if run_id is not None:
        try:
            tracking.get_run(run_id)
        except Exception:
            log.warning("resume: run %s is not in this MLflow store; starting a new run tagged with it", run_id)
            all_tags[tracking.TAG_RESUMED_FROM] = run_id
            run_id = None
    all_tags.update(tags or {})

    def killed(exc: BaseException) -> bool:
        return bool(stop_exc) and exc is stop_exc[0]

    with tracking.run(
        stage="finetune",
        run_name=run_name,
        tags=all_tags,
        nested=nested,
        run_id=run_id,
        killed=killed,
        system_metrics=True,
    ) as active:
        # A resumed run keeps its logged parameters; the ones changed on resume are in TAG_RESUME_CHANGES.
        tracking.log_params(config_mod.to_dict(cfg))
        tracking.log_params(meta.to_dict(), prefix="data.")
        source = (tags or {}).get(tracking.TAG_DATA_URI) or str(Path(cfg.data_dir).resolve())
        tracking.log_dataset_input(meta.dataset, source, bins.fingerprint(cfg.data_dir), context="training")
        if resumed is None:
            tracking.log_dict(config_mod.to_dict(cfg), "config.yaml")
        try:
            yield active
        except BaseException as exc:
            if stop_exc and exc is stop_exc[0]:
                tracking.set_tags({tracking.TAG_STOP: type(exc).__name__})
            elif isinstance(exc, Exception):
                with contextlib.suppress(Exception):
                    tracking.set_tags({tracking.TAG_ERROR: one_line(exc)})
            raise


def eval_metrics(
    train_loss: float, val_loss: float, tokens_seen: int, by_source: dict[str, float], best_val: float | None
) -> dict[str, float]:
    """An evaluation's metrics; `best_val` (the best loss so far) when this evaluation wrote the best model."""
    logged = {
        tracking.M_VAL_LOSS: val_loss,
        tracking.M_EVAL_TRAIN_LOSS: train_loss,
        tracking.M_TOKENS_SEEN: tokens_seen,
        **{tracking.source_val_metric(name): loss for name, loss in by_source.items()},
    }
    if best_val is not None:
        logged[tracking.M_BEST_VAL_LOSS] = best_val
    return logged


def step_metrics(
    loss: float, lr: float, tokens_per_s: float, tokens_per_s_total: float, mfu: float | None, device: torch.device
) -> dict[str, float]:
    """A logged step's metrics: loss, learning rate, throughput (this step's, and end to end: evaluation,
    claim scoring and checkpoint writes included), MFU when the card's peak is known, CUDA peak memory."""
    logged = {
        tracking.M_TRAIN_LOSS: loss,
        tracking.M_LR: lr,
        tracking.M_TRAIN_TOKENS_PER_S: tokens_per_s,
        tracking.M_TRAIN_TOKENS_PER_S_TOTAL: tokens_per_s_total,
    }
    if mfu is not None:
        logged[tracking.M_MFU] = mfu
    if device.type == "cuda":
        logged.update(gpu_memory(device))
    return logged


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory since the start (allocated by tensors, reserved by the caching allocator), in GB."""
    return {
        tracking.M_GPU_MEM: torch.cuda.max_memory_allocated(device) / 1e9,
        tracking.M_GPU_MEM_RESERVED: torch.cuda.max_memory_reserved(device) / 1e9,
    }


def final_artifacts(out_dir: Path, ckpt_dir: Path, train_curve: list, val_curve: list, best_iter: int) -> None:
    """The loss curve (train and val against tokens seen), the best model and LoRA's adapters, as artifacts."""
    curve = plots.line_plot(
        out_dir / CURVE_FILE,
        {"train": train_curve, "val": val_curve},
        xlabel="tokens seen",
        ylabel="cross-entropy loss",
        title=f"fine-tune (best val at iteration {best_iter})",
        markers=("val",),
    )
    tracking.log_artifact(curve)
    if ckpt_dir.is_dir():
        tracking.log_artifact(ckpt_dir, artifact_path=CHECKPOINT_DIR, link=True)
    if (out_dir / lora.ADAPTER_DIR).is_dir():
        tracking.log_artifact(out_dir / lora.ADAPTER_DIR, artifact_path=lora.ADAPTER_DIR)


def register(ckpt_dir: Path, run_id: str | None, name: str, alias: str | None) -> None:
    """The best model into MLflow's registry (transformers flavour), tagged with where its training_info lies."""
    model = load_model(str(ckpt_dir), dtype=torch.float32)
    tokenizer = load_tokenizer(ckpt_dir)
    info_uri = f"runs:/{run_id}/{CHECKPOINT_DIR}/{INFO_FILE}"
    version = tracking.register_hf_model(model, tokenizer, name, alias, {tracking.TAG_TRAINING_INFO: info_uri})
    shown = f"@{alias}" if alias else f"/{version}"
    log.info("registered the best model as models:/%s%s (version %s)", name, shown, version)
