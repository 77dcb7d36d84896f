"""What a dose series costs: `fakegpt mixture` with 1 seed and with N seeds, or with 1 and N worker processes.

    PYTHONPATH=. python tools/bench_mixture.py [--config experiments/mixture/demo.yaml] [--seeds 3]
        [--fractions 0,0.5]
    PYTHONPATH=. python tools/bench_mixture.py --workers 2 --seeds 2 --fractions 0,0.5   # 4 cells
    PYTHONPATH=. python tools/bench_mixture.py --aggregate   # --report-only over 6 doses x 6 seeds

Each run is the command users run (`python -m fakegpt mixture --config ...`) in a fresh MLflow store, so no
step is reused. Seeds: N seeds share each dose's prepared mixture and the series' general held-out set; prints
both wall times and their ratio against the bound (2.5x for 3 seeds). Workers: the same series (N seeds) in
one process and with --workers N; prints both wall times and their ratio against the bound (0.65x for 2).
Aggregate: the report of a 36-cell series (6 doses x 6 seeds) rebuilt by `fakegpt mixture --report-only true`,
against the bound (10 s). The store is built from one real cell: a one-cell series runs for real, then its
prepare, finetune, sample and score runs are registered again (parameters, metrics with the fine-tune's
curves, the artifacts the report reads) as the 36 cells' runs, each carrying the step key the report looks it
up by, so the command finds 36 finished cells as it would after a real series (every cell the same model:
the timing, not the numbers, is the point). The fine-tune's checkpoint is not copied (the report never
reads it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BOUND = 2.5
WORKERS_BOUND = 0.65
AGGREGATE_BOUND = 10.0  # seconds: --report-only over 36 cells
AGGREGATE_FRACTIONS = "0,0.09,0.2,0.33,0.5,0.8"
AGGREGATE_SEEDS = 6
# Small steps: the one real cell's cost is not what is measured.
TINY = ["--max-iters", "4", "--num-samples", "1", "--max-new-tokens", "4", "--register-models", "false"]


def run(config: str, seeds: int, fractions: str, folder: Path, workers: int = 1) -> float:
    """Wall seconds of one series in its own store and output folder."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "fakegpt", "mixture", "--config", config, "--seeds", str(seeds)]
    argv += ["--out-root", str(folder / "out"), "--series-name", f"bench-{seeds}", "--workers", str(workers)]
    if fractions:
        argv += ["--fractions", fractions]
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mixture --seeds {seeds} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def clone_run(client: Any, experiment: str, source: Any, tags: dict[str, str], files: Path | None) -> str:
    """A FINISHED copy of the run `source` carrying `tags`: its parameters, every point of its metrics, and the
    artifacts under `files`."""
    from mlflow.entities import Metric, Param

    run_id = client.create_run(experiment, tags={**source.data.tags, **tags}).info.run_id
    points = [
        Metric(key, m.value, m.timestamp, m.step)
        for key in source.data.metrics
        for m in client.get_metric_history(source.info.run_id, key)
    ]
    params = [Param(k, v) for k, v in source.data.params.items()]
    for i in range(0, max(len(points), len(params), 1), 100):  # MLflow's batch limits (1,000 metrics, 100 params)
        client.log_batch(run_id, metrics=points[i : i + 100], params=params[i : i + 100])
    if files is not None:
        client.log_artifacts(run_id, str(files))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def build_store(config: str, folder: Path) -> list[str]:
    """One real cell, then its runs registered as every cell of a 6 x 6 series; returns the series' flags."""
    from mlflow import MlflowClient

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.chdir(folder)  # the steps' keys are computed from where the command runs
    from fakegpt import config as config_mod
    from fakegpt import tracking
    from fakegpt.studies.cells import cell_finetune_params
    from fakegpt.studies.main import (
        PROJECT_DIR,
        finetune_step_config,
        prepare_params,
        resolve_user_paths,
        sample_params,
        score_params,
    )
    from fakegpt.studies.mixture import MixtureConfig, cell_jobs, mix_arg
    from fakegpt.studies.steps import step_key

    base = ["--config", config, "--out-root", str(folder / "out"), "--series-name", "bench-aggregate", *TINY]
    base += ["--general-data", ""]
    one = subprocess.run(
        [sys.executable, "-m", "fakegpt", "mixture", *base, "--fractions", "0", "--seeds", "1"],
        cwd=folder,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    if one.returncode != 0:
        raise SystemExit(f"the one real cell failed:\n{one.stderr[-3000:]}")
    client = MlflowClient()
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT).experiment_id
    real = {}
    for run in client.search_runs([experiment], max_results=100):
        step = run.data.tags.get(tracking.TAG_ENTRY_POINT)
        if step and step not in real:
            real[step] = run
    wanted = {"prepare": ["meta.json"], "finetune": [], "sample": ["samples.parquet"], "score": ["scores.parquet"]}
    files: dict[str, Path | None] = {}
    for step, names in wanted.items():
        files[step] = None
        if names:
            files[step] = folder / "artifacts" / step
            files[step].mkdir(parents=True)
            for name in names:
                client.download_artifacts(real[step].info.run_id, name, str(files[step]))

    argv = [*base, "--fractions", AGGREGATE_FRACTIONS, "--seeds", str(AGGREGATE_SEEDS)]
    cfg = resolve_user_paths(config_mod.parse(MixtureConfig, argv, prog="bench"))
    method = finetune_step_config(cfg).method

    def register(step: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        key = step_key(step, {k: str(v) for k, v in params.items()}, PROJECT_DIR, Path.cwd())
        tags = {**tags, tracking.TAG_STEP_KEY: key.key, tracking.TAG_CODE_STATE: key.code_state or ""}
        return clone_run(client, experiment, real[step], tags, files[step])

    for fraction in cfg.fractions:
        dose = {tracking.TAG_FRACTION: f"{fraction:g}", tracking.TAG_STUDY: cfg.series_name}
        prepared = register("prepare", prepare_params(cfg, "", cfg.dataset, mix_arg(cfg, fraction)), dose)
        for job in cell_jobs(cfg, method, {fraction: prepared}, ""):
            cell = {**dose, tracking.TAG_SEED: str(job.seed)}
            tuned = register("finetune", cell_finetune_params(cfg, job), cell)
            model = f"runs:/{tuned}/checkpoint"
            register("sample", sample_params(cfg, model), cell)
            register("score", score_params(cfg, model, f"runs:/{prepared}/data", ""), cell)
    return argv


def aggregate(config: str) -> None:
    """Time `fakegpt mixture --report-only true` on a store holding a 36-cell series."""
    with tempfile.TemporaryDirectory(prefix="bench-mixture-aggregate-") as name:
        folder = Path(name)
        argv = build_store(config, folder)
        command = [sys.executable, "-m", "fakegpt", "mixture", *argv, "--report-only", "true"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, env={**os.environ}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"--report-only failed:\n{done.stderr[-3000:]}")
        found = done.stdout.count("[score] reused run")
        cells = len(AGGREGATE_FRACTIONS.split(",")) * AGGREGATE_SEEDS
        if found != cells or "not run yet" in done.stdout:
            raise SystemExit(f"--report-only found {found} of {cells} cells:\n{done.stdout[-3000:]}")
    verdict = "met" if seconds < AGGREGATE_BOUND else "NOT met"
    print(f"report of {cells} cells (--report-only): {seconds:.1f} s (bound {AGGREGATE_BOUND:g} s): {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "mixture" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fractions", default="", help="override the config's fractions (comma list)")
    parser.add_argument("--workers", type=int, default=0, help="compare 1 and N worker processes instead of seeds")
    parser.add_argument("--aggregate", action="store_true", help="time --report-only over a 36-cell series instead")
    args = parser.parse_args()
    if args.aggregate:
        aggregate(args.config)
        return
    if args.workers:
        times = {}
        for workers in (1, args.workers):
            with tempfile.TemporaryDirectory(prefix=f"bench-mixture-w{workers}-") as folder:
                times[workers] = run(args.config, args.seeds, args.fractions, Path(folder), workers)
            print(f"workers={workers}: {times[workers]:.1f} s", flush=True)
        ratio = times[args.workers] / times[1]
        verdict = "met" if ratio <= WORKERS_BOUND else "NOT met"
        print(f"{args.workers} workers / 1 process: {ratio:.2f}x (bound {WORKERS_BOUND}x): {verdict}")
        return
    times = {}
    for seeds in (1, args.seeds):
        with tempfile.TemporaryDirectory(prefix=f"bench-mixture-{seeds}-") as folder:
            times[seeds] = run(args.config, seeds, args.fractions, Path(folder))
        print(f"seeds={seeds}: {times[seeds]:.1f} s", flush=True)
    ratio = times[args.seeds] / times[1]
    print(f"{args.seeds} seeds / 1 seed: {ratio:.2f}x (bound {BOUND}x): {'met' if ratio <= BOUND else 'NOT met'}")


if __name__ == "__main__":
    main()
