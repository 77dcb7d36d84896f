"""The MLflow model registry: a fine-tuned model registered under a name and alias (`models:/NAME@ALIAS`), and
the tags of a registered version read back."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def register_hf_model(
    model: Any, tokenizer: Any, name: str, alias: str | None = "", tags: Mapping[str, str] | None = None
) -> str:
    """Log a transformers model with MLflow's transformers flavour in the active run, register it as `name` (alias
    `alias`), tag the version; returns the version. `models:/NAME@ALIAS` then names it in sample and score."""
    import mlflow

    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        registered_model_name=name,
        pip_requirements=["torch", "transformers"],  # inferring them imports torchvision, which is not needed
    )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    if alias:
        client.set_registered_model_alias(name, alias, version)
    for key, value in (tags or {}).items():
        client.set_model_version_tag(name, version, key, str(value))
    return version


def model_version_tags(uri: str) -> dict[str, str]:
    """The tags of the registered version `models:/NAME@ALIAS` or `models:/NAME/VERSION` names ({} otherwise)."""
    match = re.fullmatch(r"models:/+([^/@]+)(?:@([^/]+)|/(\d+))/?", uri)
    if not match:
        return {}
    import mlflow

    client = mlflow.MlflowClient()
    name, alias, number = match.groups()
    version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    return dict(version.tags)
