"""A stage's MLflow run: the tracking URI, starting or joining the run, its tags, parameters and metrics.

Stages call `run(stage=..., ...)` as a context manager. When started by `mlflow run`, MLFLOW_RUN_ID is set and
the stage joins that run instead of creating another; otherwise it starts a new run (nested under an active
parent when `nested=True`). With no MLFLOW_TRACKING_URI the store is MLflow's own `sqlite:///mlflow.db` in the
working folder. A tracking server that is down at start-up is reported within seconds, not retried for minutes.
MLflow is imported inside the functions, so that a stage that only needs names does not pay for importing it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from fakegpt import __version__
from fakegpt.errors import FakegptError
from fakegpt.tracking.names import (
    DEFAULT_EXPERIMENT,
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND,
    TAG_DATASET,
    TAG_EXPERIMENT_KIND,
    TAG_FRACTION,
    TAG_MIX,
    TAG_MODEL,
    TAG_RUN_NAME,
    TAG_STAGE,
    TAG_VERSION,
)

_PARAM_MAX = 6000  # MLflow's limit on a parameter value's length


def setup() -> str:
    """Resolve the tracking URI (default sqlite:///mlflow.db) and fail fast if a server is unreachable."""
    # Fail within seconds rather than MLflow's default of minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    os.environ["MLFLOW_TRACKING_URI"] = uri
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    return uri


def check_server(uri: str, timeout: float = 3.0) -> None:
    """Raise FakegptError unless the tracking server at `uri` answers its /health endpoint."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user-supplied tracking URI)
            if resp.status >= 400:
                raise FakegptError(f"MLFLOW_TRACKING_URI={uri}: tracking server answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FakegptError(
            f"MLFLOW_TRACKING_URI={uri}: tracking server unreachable ({reason}); start it, or unset "
            "MLFLOW_TRACKING_URI to log to sqlite:///mlflow.db"
        ) from None


@contextlib.contextmanager
def run(
    stage: str,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    nested: bool = False,
    run_id: str | None = None,
    experiment: str | None = None,
    killed: Callable[[BaseException], bool] | None = None,
    system_metrics: bool | None = None,
) -> Iterator[Any]:
    """Start (or join) an MLflow run for a stage and yield the active run.

    Joins, in order: an explicit `run_id` (resume), MLFLOW_RUN_ID set by `mlflow run`, else starts a new run
    in MLFLOW_EXPERIMENT_NAME / `experiment` / "fakegpt", nested under the active run when `nested`.
    The run ends KILLED on Ctrl-C or when `killed(exc)` is true (a deliberate stop), FAILED on other errors.
    `system_metrics` logs CPU/GPU/memory use alongside (MLflow's system metrics, `fakegpt[metrics]`: psutil, and
    nvidia-ml-py for GPUs); by default on for a stage's own run, off for nested children (trials, per-model runs),
    whose parent already samples the same machine.
    """
    setup()
    import mlflow

    try:
        # A nested run under an active parent is a new child, never the run `mlflow run` started (the parent
        # already joined that one; joining it again would log the child into it and end it early).
        joined = run_id or (None if nested and mlflow.active_run() else os.environ.get("MLFLOW_RUN_ID"))
        if not joined and not (nested and mlflow.active_run()):
            name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
            if not os.environ.get("MLFLOW_EXPERIMENT_ID"):
                mlflow.set_experiment(name)
        child = nested and mlflow.active_run() is not None
        sample_system = (not child) if system_metrics is None else system_metrics
        extra = {"log_system_metrics": True} if sample_system and _has_psutil() else {}
        # mlflow.start_run itself joins MLFLOW_RUN_ID when given no run_id: hide it while a child starts.
        hidden = os.environ.pop("MLFLOW_RUN_ID", None) if not joined else None
        try:
            new_name = None if joined else run_name or default_run_name(stage, tags or {})
            active = mlflow.start_run(run_id=joined, run_name=new_name, nested=nested, **extra)
        finally:
            if hidden is not None:
                os.environ["MLFLOW_RUN_ID"] = hidden
    except FakegptError:
        raise
    except Exception as exc:  # MLflow raises many types for a bad store; the user needs one line
        raise FakegptError(f"MLflow tracking at {os.environ.get('MLFLOW_TRACKING_URI')}: {exc}") from None
    status = "FINISHED"
    try:
        all_tags = {TAG_STAGE: stage, TAG_VERSION: __version__}
        all_tags.update({k: str(v) for k, v in (tags or {}).items()})
        if joined and not run_id:  # `mlflow run` named it at random ("funny-yak-295"): name it by what it is
            all_tags[TAG_RUN_NAME] = run_name or default_run_name(stage, all_tags)
        mlflow.set_tags(all_tags)
        mark_experiment(active.info.experiment_id)
        yield active
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException as exc:
        status = "KILLED" if killed is not None and killed(exc) else "FAILED"
        raise
    finally:
        with contextlib.suppress(Exception):
            mlflow.end_run(status=status)


def join_run(run_id: str) -> None:
    """Make the existing run `run_id` this process's active run without ever ending it here (a worker process of
    a series: the runs it starts are the series' children; the series' own process ends the run)."""
    setup()
    import mlflow

    mlflow.start_run(run_id=run_id)


def default_run_name(stage: str, tags: Mapping[str, Any]) -> str:
    """ "finetune gpt2-medium antivax_mix general=0.80,antivax=0.20": stage, model, data, dose, from the run's tags."""
    parts = [stage]
    model = str(tags.get(TAG_MODEL) or "")
    if model:
        short = []
        for spec in model.split(","):
            match = re.match(r"(?:runs|models):/+([^/]+)", spec)
            short.append(f"run {match.group(1)[:8]}" if match else Path(spec.rstrip("/")).name or spec)
        parts.append(",".join(short))
    for key in (TAG_DATASET, TAG_MIX):
        if tags.get(key):
            parts.append(str(tags[key]))
    if tags.get(TAG_FRACTION) not in (None, "") and not tags.get(TAG_MIX):
        parts.append(f"dose {tags[TAG_FRACTION]}")
    return " ".join(parts)[:250]


def mark_experiment(experiment_id: str) -> None:
    """Tag the experiment as model training (once), so MLflow's UI opens it on the runs table."""
    with contextlib.suppress(Exception):  # a read-only or older store: the runs are fine without the tag
        import mlflow

        client = mlflow.MlflowClient()
        if TAG_EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)


def _has_psutil() -> bool:
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings -> `a.b` keys with string values, each within MLflow's length limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        out[name] = text[:_PARAM_MAX]
    return out


def log_params(params: Mapping[str, Any], prefix: str = "") -> None:
    """Log (flattened) parameters; a value already logged with the same content is not an error."""
    import mlflow

    flat = flatten(params, prefix)
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    fresh = {k: v for k, v in flat.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def log_metrics(metrics: Mapping[str, float | None], step: int | None = None) -> None:
    """Log finite metrics (MLflow rejects NaN on some stores; a NaN is reported by the stage itself)."""
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if clean:
        import mlflow

        mlflow.log_metrics(clean, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    """Set tags on the active run."""
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_dict(data: Any, artifact_file: str) -> None:
    """Log `data` as a JSON/YAML artifact file of the active run."""
    import mlflow

    mlflow.log_dict(data, artifact_file)


def active_run_id() -> str | None:
    """The active run's id, or None."""
    import mlflow

    active = mlflow.active_run()
    return active.info.run_id if active else None


def get_run(run_id: str) -> Any:
    """The MLflow run `run_id`."""
    import mlflow

    return mlflow.MlflowClient().get_run(run_id)


def find_run_ids(experiment_id: str, tags: Mapping[str, Any]) -> list[str]:
    """Ids of the runs in `experiment_id` carrying all these tags (e.g. a trial's run, found after it ended)."""
    from mlflow.tracking import MlflowClient

    clauses = [f"tags.`{k}` = '{v!s}'" for k, v in tags.items()]
    runs = MlflowClient().search_runs([experiment_id], filter_string=" and ".join(clauses), max_results=100)
    return [r.info.run_id for r in runs]


def tag_values(experiment_id: str, tags: Mapping[str, Any], key: str, missing: str) -> set[str]:
    """The values of tag `key` over the runs in `experiment_id` carrying all `tags` (`missing` for a run without
    it): e.g. the methods a series' fine-tunes used."""
    from mlflow.tracking import MlflowClient

    clauses = " and ".join(f"tags.`{k}` = '{v!s}'" for k, v in tags.items())
    runs = MlflowClient().search_runs([experiment_id], filter_string=clauses, max_results=1000)
    return {r.data.tags.get(key, missing) for r in runs}


def update_run(run_id: str, tags: Mapping[str, Any] | None = None, status: str | None = None) -> None:
    """Set tags and/or the terminal status (FINISHED | FAILED | KILLED) of a run, also one that has ended."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for key, value in (tags or {}).items():
        client.set_tag(run_id, key, str(value)[:_PARAM_MAX])
    if status:
        client.set_terminated(run_id, status=status)


def metric_history(run_id: str, name: str) -> list[tuple[int, float]]:
    """(step, value) of every point of one metric of a run, in step order."""
    import mlflow

    points = mlflow.MlflowClient().get_metric_history(run_id, name)
    return sorted((int(m.step), float(m.value)) for m in points)


def log_table(data: Mapping[str, list], artifact_file: str) -> None:
    """Log a column -> values mapping as one MLflow table (shown in the UI's artifact and evaluation views).

    Log one table per grid, not one per cell: MLflow's table logging degrades past ~80 tables in a run.
    """
    try:
        import mlflow

        mlflow.log_table(data=dict(data), artifact_file=artifact_file)
    except Exception as exc:
        raise FakegptError(f"could not log table {artifact_file} to MLflow ({exc})") from None
