"""What a dose series costs: `fakegpt mixture` with 1 seed and with N seeds, or with 1 and N worker processes.

    PYTHONPATH=. python tools/bench_mixture.py [--config experiments/mixture/demo.yaml] [--seeds 3]
        [--fractions 0,0.5]
    PYTHONPATH=. python tools/bench_mixture.py --workers 2 --seeds 2 --fractions 0,0.5   # 4 cells

Each run is the command users run (`python -m fakegpt mixture --config ...`) in a fresh MLflow store, so no
step is reused. Seeds: N seeds share each dose's prepared mixture and the series' general held-out set; prints
both wall times and their ratio against the bound (2.5x for 3 seeds). Workers: the same series (N seeds) in
one process and with --workers N; prints both wall times and their ratio against the bound (0.65x for 2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOUND = 2.5
WORKERS_BOUND = 0.65


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "mixture" / "demo.yaml"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--fractions", default="", help="override the config's fractions (comma list)")
    parser.add_argument("--workers", type=int, default=0, help="compare 1 and N worker processes instead of seeds")
    args = parser.parse_args()
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
