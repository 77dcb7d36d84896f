"""Files in and out of MLflow runs: artifacts logged (hard-linked where the store allows), artifact URIs
downloaded, and prepared datasets recorded as run inputs (MLflow's Dataset lineage).

MLflow is imported inside the functions, so that a stage that only needs names does not pay for importing it.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fakegpt.errors import FakegptError

log = logging.getLogger(__name__)


def _dataset_source(source: str) -> Any:
    """An MLflow DatasetSource for a folder or artifact URI (`runs:/<id>/data` -> the artifact store's own URI)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    if source.startswith("runs:/"):
        source = RunsArtifactRepository.get_underlying_uri(source)
    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local-file source types
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(source)
    except Exception:  # an artifact store MLflow has no dataset source type for (mlflow-artifacts:/ on a server)
        return HTTPDatasetSource(url=source)


def log_dataset_input(name: str, source: str, fingerprint: Mapping[str, str], context: str) -> None:
    """Record a prepared dataset as an input of the active run (MLflow's Dataset lineage and the runs table's
    Dataset column): its name, where it lies, and the bins' sha256 and token counts as digest and tags."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    tags = {k: str(v) for k, v in fingerprint.items() if k != "digest"}
    try:
        dataset = MetaDataset(_dataset_source(source), name=name, digest=fingerprint["digest"])
        mlflow.log_input(dataset, context=context, tags=tags)
    except Exception as exc:  # lineage is a convenience: never fail a finished prepare or a training run for it
        log.warning("could not record dataset %s as an MLflow input (%s)", name, exc)


def log_artifact(path: str | Path, artifact_path: str | None = None, link: bool = False) -> None:
    """Log a file or folder. If the store refuses it, say where the file stays on disk.

    `link`: where the run's artifacts are a local folder on the same file system, hard-link the files instead
    of copying them (a best model is 1.4 GB at gpt2-medium, 6.2 GB at gpt2-xl: that much less to write and to
    keep at the end of every run). Only for files that are replaced, never changed in place: fakegpt writes a
    checkpoint as new files and renames them in, so the run's copy keeps the bytes it was logged with."""
    import mlflow

    path = Path(path)
    try:
        if link and _link_artifacts(path, artifact_path):
            return
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)
    except Exception as exc:
        raise FakegptError(f"could not log artifact to MLflow ({exc}); it is kept on disk at {path}") from None


def _link_artifacts(path: Path, artifact_path: str | None) -> bool:
    """Hard-link `path` (a file, or a folder's files) into the active run's local artifact folder; False (and
    nothing left behind) where the store is not a local folder or the file system cannot link there."""
    import mlflow
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import is_local_uri

    uri = mlflow.get_artifact_uri(artifact_path)
    if not is_local_uri(uri):
        return False
    target = Path(local_file_uri_to_path(uri))
    if not path.is_dir():
        target = target / path.name
    files = [path] if not path.is_dir() else sorted(p for p in path.rglob("*") if p.is_file())
    made: list[Path] = []
    try:
        for source in files:
            dest = target if source == path else target / source.relative_to(path)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists() and dest.samefile(source):  # logged again unchanged (rename would keep both names)
                continue
            tmp = dest.with_name(f".{dest.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(source, tmp)
            os.replace(tmp, dest)  # a resumed run logs its checkpoint again over the old one
            made.append(dest)
    except OSError as exc:
        log.debug("copying %s into the run's artifacts instead of linking (%s)", path, exc)
        for dest in made:
            dest.unlink(missing_ok=True)
        return False
    return True


def download(uri: str, dst: str | Path | None = None) -> Path:
    """Download an artifact URI (runs:/..., models:/..., file://, s3://...) and return the local path."""
    import mlflow

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=None if dst is None else str(dst)))
    except Exception as exc:
        raise FakegptError(f"{uri}: cannot download artifacts ({exc})") from None


def is_artifact_uri(text: str) -> bool:
    """True for URIs MLflow resolves to artifacts (`runs:/`, `models:/`, `mlflow-artifacts:/`)."""
    return "://" in text or text.startswith(("runs:/", "models:/"))


def local_path(path_or_uri: str) -> Path:
    """A local path as is; an artifact URI downloaded to a local cache first (how steps pass data)."""
    return download(path_or_uri) if is_artifact_uri(path_or_uri) else Path(path_or_uri)
