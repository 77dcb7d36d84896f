"""What makes two runs of a chained step the same: a key over the content of everything the step reads.

`pipeline` and `mixture` reuse a FINISHED step run instead of running it again only when its key matches.
The key covers the step's parameters, the content (sha256) of every local file a parameter names (a file, a
glob, or a folder such as a data folder), the files that a named YAML names in turn (a dataset YAML's sources,
a sweep's base config), fakegpt's version, and the code state: the git commit plus a hash of uncommitted
changes to tracked files. Parameter strings alone missed an edited prompt file, an edited YAML, uncommitted
code and new files matching the same data glob, and returned stale results.

Outside a git checkout the code state is unknown; a step is then never reused unless the user asks for it
(`--reuse force`), since a stale result in a research record is worse than a re-run.

A step runs as an MLflow project entry point, a child run of the active run (MLflow's multistep-workflow
pattern): `run_entry_point` starts it and `find_finished_run` finds one to reuse. They call MLflow here rather
than in `fakegpt.tracking` because chaining steps is this module's business alone.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fakegpt import __version__, tracking
from fakegpt.errors import FakegptError

REUSE_MODES = ("true", "false", "force")  # reuse when the code state is known | never | even when unknown
OUTPUT_KEYS = ("out", "out_dir", "out_root")  # where a step writes: part of the key as text, never hashed
_CHUNK = 1 << 20
log = logging.getLogger(__name__)


@dataclass
class StepKey:
    """A step's identity: `key` (hex) and what went into it, for the log and the run's tags."""

    key: str
    code_state: str | None  # "commit+diffhash", or None outside a git checkout
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 of every input file hashed


def code_state(project_dir: str | Path) -> str | None:
    """The git commit plus a hash of uncommitted changes to tracked files; None when git cannot say."""
    try:
        head = subprocess.run(
            ["git", "-C", str(project_dir), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return None
        diff = subprocess.run(
            ["git", "-C", str(project_dir), "diff", "HEAD", "--binary"], capture_output=True, timeout=30
        )
        if diff.returncode != 0:
            return None
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = hashlib.sha256(diff.stdout).hexdigest()[:16] if diff.stdout else "clean"
    return f"{head.stdout.strip()}+{dirty}"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _candidates(value: str) -> list[str]:
    """The path-like pieces of a parameter value: the whole value, and each item of a comma list."""
    pieces = [value] + [p.strip() for p in value.split(",")]
    out = []
    for piece in pieces:
        _, _, tail = piece.partition("=")  # `--mix a.csv=0.8` names a.csv
        for text in (piece, tail):
            if text and "://" not in text and not text.startswith(("runs:/", "models:/")) and text not in out:
                out.append(text)
    return out


def _files_named(value: str, roots: list[Path]) -> list[Path]:
    """Local files a parameter value names: files, globs, and every file inside a named folder."""
    found: list[Path] = []
    for text in _candidates(value):
        for root in roots:
            path = Path(text) if Path(text).is_absolute() else root / text
            if any(ch in text for ch in "*?["):
                matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
                found += [m for m in matches if m.is_file()]
            elif path.is_file():
                found.append(path)
            elif path.is_dir() and text not in (".", ""):
                found += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            else:
                continue
            break  # the first root that resolves the piece is the one the step will use
    return found


_YAML_STRINGS: dict[str, list[str]] = {}  # sha256 of a YAML file's bytes -> its string values


def _yaml_strings(path: Path, digest: str = "") -> list[str]:
    """Every string value in a YAML file (a dataset YAML's source paths, a sweep's base file). Remembered by the
    file's content digest: a series keys every cell's steps, and each names the same claims and config YAMLs."""
    if digest in _YAML_STRINGS:
        return _YAML_STRINGS[digest]
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, Mapping):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    if digest:
        _YAML_STRINGS[digest] = out
    return out


def step_key(entry_point: str, params: Mapping[str, str], project_dir: str | Path, cwd: str | Path) -> StepKey:
    """The content key of running `entry_point` with `params` from `cwd` in the checkout `project_dir`."""
    roots = [Path(cwd).resolve(), Path(project_dir).resolve()]
    files: dict[str, str] = {}
    for name, value in params.items():
        if name in OUTPUT_KEYS:
            continue
        for path in _files_named(str(value), roots):
            digest = files.setdefault(str(path.resolve()), file_sha256(path))
            if path.suffix in (".yaml", ".yml"):  # files the YAML names, relative to it or to the roots
                for text in _yaml_strings(path, digest):
                    for named in _files_named(text, [path.parent, *roots]):
                        files.setdefault(str(named.resolve()), file_sha256(named))
    state = code_state(project_dir)
    body = {
        "entry_point": entry_point,
        "params": {k: str(v) for k, v in sorted(params.items())},
        "files": sorted(files.values()),  # contents, not where they lie: a moved copy is the same input
        "version": __version__,
        "code": state,
    }
    key = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return StepKey(key=key, code_state=state, files=files)


def find_step(project_dir: str | Path, entry_point: str, parameters: Mapping[str, Any]) -> str | None:
    """The FINISHED run with the same key as running `entry_point` with `parameters` would have, or None (also
    outside a git checkout, where the code state is unknown): a report rebuilt without running anything."""
    params = {k: ("" if v is None else str(v)) for k, v in parameters.items()}
    key = step_key(entry_point, params, project_dir, Path.cwd())
    if key.code_state is None:
        return None
    return find_finished_run({tracking.TAG_STEP_KEY: key.key, tracking.TAG_ENTRY_POINT: entry_point})


def run_or_find(
    project_dir: str | Path,
    entry_point: str,
    parameters: Mapping[str, Any],
    env_manager: str,
    reuse: str = "true",
    lookup: bool = False,
) -> tuple[str | None, bool]:
    """`run_step`, or with `lookup` only `find_step` (a report rebuilt without running anything): (run id or None
    when it has not run, reused)."""
    if lookup:
        return find_step(project_dir, entry_point, parameters), True
    return run_step(project_dir, entry_point, parameters, env_manager, reuse=reuse)


def run_step(
    project_dir: str | Path, entry_point: str, parameters: Mapping[str, Any], env_manager: str, reuse: str = "true"
) -> tuple[str, bool]:
    """Run an MLproject entry point as a child of the active run, or reuse a FINISHED run with the same key.

    Returns (run_id, reused). The key is logged on the run as the tag `fakegpt.step_key`, and the log says
    which step was reused and why, or why it was not.
    """
    if reuse not in REUSE_MODES:
        raise FakegptError(f"--reuse: expected one of {', '.join(REUSE_MODES)}, got {reuse!r}")
    params = {k: ("" if v is None else str(v)) for k, v in parameters.items()}
    key = step_key(entry_point, params, project_dir, Path.cwd())
    if reuse == "true" and key.code_state is None:
        log.info(
            "step %s: code state unknown (not a git checkout): running it (--reuse force reuses anyway)", entry_point
        )
    elif reuse in ("true", "force"):
        found = find_finished_run({tracking.TAG_STEP_KEY: key.key, tracking.TAG_ENTRY_POINT: entry_point})
        if found:
            log.info(
                "step %s: reusing finished run %s: same parameters, %d input files with the same content, "
                "same fakegpt %s and code %s (key %s)",
                entry_point,
                found,
                len(key.files),
                __version__,
                key.code_state or "unknown",
                key.key[:12],
            )
            return found, True
        log.info(
            "step %s: no finished run with key %s (parameters, input files or code changed): running it",
            entry_point,
            key.key[:12],
        )
    run_id = run_entry_point(project_dir, entry_point, params, env_manager)
    tracking.update_run(run_id, {tracking.TAG_STEP_KEY: key.key, tracking.TAG_CODE_STATE: key.code_state or ""})
    return run_id, False


# --- MLflow projects: chaining entry points as child runs -----------------------------------------------------
def find_finished_run(tags: Mapping[str, str]) -> str | None:
    """Id of the newest FINISHED run in the active run's experiment carrying all these tags, or None."""
    import mlflow

    active = mlflow.active_run()
    if active is None:
        return None
    clauses = [f"tags.`{k}` = '{v}'" for k, v in tags.items()] + ["attributes.status = 'FINISHED'"]
    runs = mlflow.MlflowClient().search_runs(
        [active.info.experiment_id],
        filter_string=" and ".join(clauses),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_entry_point(
    project_dir: str | Path,
    entry_point: str,
    params: Mapping[str, str],
    env_manager: str,
    run_id: str | None = None,
) -> str:
    """Run an MLproject entry point synchronously as a child of the active run; returns its run id.

    `env_manager` is passed explicitly: child `mlflow.run` calls do not inherit the `--env-manager local` of the
    command that started the parent. With `run_id` the entry point runs in that existing run (a resumed
    fine-tune continues the run it started) instead of a new one.
    """
    import mlflow
    from mlflow.projects.utils import MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG

    active = mlflow.active_run()
    try:
        submitted = mlflow.projects.run(
            str(project_dir),
            entry_point=entry_point,
            parameters=dict(params),
            env_manager=env_manager,
            experiment_id=active.info.experiment_id if active else None,
            synchronous=True,
            backend_config={MLFLOW_LOCAL_BACKEND_RUN_ID_CONFIG: run_id} if run_id else None,
        )
    except mlflow.exceptions.ExecutionException as exc:
        raise FakegptError(f"step {entry_point!r} failed: {exc}") from None
    return submitted.run_id
