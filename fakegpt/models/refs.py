"""Model specs for the measuring stages: a hub name, a local HF folder, or an MLflow URI of a finetune run.

    gpt2                          hub name (local Hugging Face cache, or downloaded when online)
    out/finetune/checkpoint       a local HF-format folder (what `fakegpt finetune` writes)
    runs:/<run_id>                that run's `checkpoint` artifact
    runs:/<run_id>/checkpoint     the same, spelled out
    models:/<name>/<version>      a registered model version (its files, or a `checkpoint` folder inside)

A fine-tuned checkpoint carries `training_info.json` (init_from, config, the prepare meta with its `mixture`
fractions, iter, val_loss, tokens_seen); the dose fraction of a model is read from there.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fakegpt import tracking
from fakegpt.errors import FakegptError
from fakegpt.models import architecture
from fakegpt.models.checkpoint import CHECKPOINT_DIR, TrainingInfo
from fakegpt.models.loading import load_model, model_config, resolve_pretrained

CHECKPOINT_ARTIFACT = CHECKPOINT_DIR  # the artifact path finetune logs its checkpoint folder under


@dataclass
class ModelRef:
    """A model as the measuring stages see it: the spec as written, a local folder, its training info."""

    spec: str  # as the user wrote it (the `model` column of every table)
    folder: str  # local HF folder (downloaded for MLflow URIs)
    training_info: TrainingInfo | None = None  # None: not a fakegpt fine-tune (hub model, plain HF folder)

    def fraction(self, source: str = "antivax") -> float | None:
        """The share of `source` in this model's fine-tuning mixture, when its training_info records one."""
        return self.training_info.fraction(source) if self.training_info else None


def is_mlflow_uri(spec: str) -> bool:
    """True for `runs:/`, `models:/` and `mlflow-artifacts:/` specs (downloaded through MLflow)."""
    return spec.startswith(("runs:/", "models:/", "mlflow-artifacts:/"))


def _artifact_uri(spec: str) -> str:
    """`runs:/<id>` alone means the run's checkpoint artifact."""
    match = re.fullmatch(r"runs:/+([0-9A-Za-z]+)/?", spec)
    return f"runs:/{match.group(1)}/{CHECKPOINT_ARTIFACT}" if match else spec


def resolve_model(spec: str) -> ModelRef:
    """Turn a model spec into a local folder (downloading MLflow artifacts) plus its training_info, if any."""
    spec = spec.strip()
    if not spec:
        raise FakegptError("empty model spec (give a hub name, a model folder or runs:/<run_id>)")
    if is_mlflow_uri(spec):
        tracking.setup()
        root = local = Path(tracking.download(_artifact_uri(spec)))
        for inner in (CHECKPOINT_ARTIFACT, "model"):  # a run's checkpoint/; a registered model's model/ (flavour)
            if not (local / "config.json").is_file() and (local / inner / "config.json").is_file():
                local = local / inner
        if not (local / "config.json").is_file():
            raise FakegptError(f"{spec}: the downloaded artifact is not an HF model folder (no config.json)")
        _tokenizer_beside_weights(root, local)
        folder = str(local)
    else:
        folder = resolve_pretrained(spec)
    info = TrainingInfo.load(folder)
    if info is None and spec.startswith("models:/"):  # a registered version points at its run's training_info
        info_uri = tracking.model_version_tags(spec).get(tracking.TAG_TRAINING_INFO)
        if info_uri:
            info = TrainingInfo.load(Path(tracking.download(info_uri)).parent)
    return ModelRef(spec=spec, folder=folder, training_info=info)


def _tokenizer_beside_weights(root: Path, folder: Path) -> None:
    """MLflow's transformers flavour keeps a registered model's tokenizer apart from its weights
    (components/tokenizer/); copied back beside them (into the download, a private copy), a model that brings its
    own tokenizer is read with it, not with GPT-2's, which a folder without tokenizer files means."""
    from fakegpt.data import hf_tokenizer

    saved = root / "components" / "tokenizer"
    if saved.is_dir() and not any((folder / name).is_file() for name in hf_tokenizer.TOKENIZER_FILES):
        for name in hf_tokenizer.TOKENIZER_FILES:
            if (saved / name).is_file():
                shutil.copyfile(saved / name, folder / name)


def load_for_inference(ref: ModelRef, device: Any, dtype: Any) -> Any:
    """The model in eval mode on `device` in `dtype` (an already resolved folder, so nothing is fetched)."""
    model = load_model(ref.folder, dtype=dtype, device=str(device))
    model.eval()
    return model


def context_length(model: Any) -> int:
    """The model's context in tokens (max_position_embeddings; GPT-2's `n_positions`, 1024 for the released
    models)."""
    return architecture.context_length(model.config)


def configured_context(ref: ModelRef) -> int:
    """The model's context length from its config.json, without loading any weights (for up-front checks)."""
    return architecture.context_of(model_config(ref.folder))
