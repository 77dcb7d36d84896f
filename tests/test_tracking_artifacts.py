"""Logging a checkpoint folder as artifacts: hard-linked into a local store (no second copy of gigabytes),
copied where the file system cannot link, and always the bytes that were logged."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fakegpt import tracking
from fakegpt.tracking import artifacts


def _checkpoint(folder: Path) -> dict[str, bytes]:
    files = {"model.safetensors": os.urandom(3000), "config.json": b"{}", "sub/training_info.json": b'{"iter": 4}'}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


def _logged(run_id: str) -> Path:
    import mlflow
    from mlflow.utils.file_utils import local_file_uri_to_path

    return Path(local_file_uri_to_path(mlflow.get_run(run_id).info.artifact_uri)) / "checkpoint"


@pytest.mark.parametrize("can_link", [True, False])
def test_checkpoint_artifacts_are_linked_into_a_local_store_or_copied(tmp_path, monkeypatch, can_link):
    import mlflow

    ckpt = tmp_path / "out" / "checkpoint"
    files = _checkpoint(ckpt)
    if not can_link:  # e.g. the artifact store on another file system

        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(artifacts.os, "link", refuse)
    mlflow.set_experiment("artifacts")  # in this test's store; its artifacts in ./mlruns, the test's folder
    with mlflow.start_run() as run:
        tracking.log_artifact(ckpt, artifact_path="checkpoint", link=True)
        tracking.log_artifact(ckpt, artifact_path="checkpoint", link=True)  # a resumed run logs it again
    logged = _logged(run.info.run_id)
    assert {p.relative_to(logged).as_posix(): p.read_bytes() for p in logged.rglob("*") if p.is_file()} == files
    same = [(logged / n).stat().st_ino == (ckpt / n).stat().st_ino for n in files]
    assert same == [can_link] * len(files)
    listed = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoint")}
    assert listed == {"checkpoint/model.safetensors", "checkpoint/config.json", "checkpoint/sub"}
    # the next best model replaces the folder with new files: the run keeps the bytes it logged
    for name in files:
        (ckpt / name).unlink()
    _checkpoint(ckpt)
    assert (logged / "model.safetensors").read_bytes() == files["model.safetensors"]
