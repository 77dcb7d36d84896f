"""What saving costs a fine-tune: bytes written and seconds spent saving per iteration, old behaviour vs. new defaults.

    python tools/bench_checkpoint.py                     # gpt2-medium shape (24 x 16 x 1024), 5 iterations each
    python tools/bench_checkpoint.py --iters 3 --block-size 32 --n-layer 12 --n-head 12 --n-embd 768   # gpt2 shape
    python tools/bench_checkpoint.py --runs new --iters 100 --eval-interval 5   # the target's run, measured whole
    python tools/bench_checkpoint.py --disk     # the disk alone: the end's 4.25 GB, page cache vs direct I/O

A scratch model trains on the CPU through `fakegpt.finetune.train.finetune` itself (block 64, micro-batch 1, no
accumulation, one evaluation batch, lr 1e-4) with an evaluation at every iteration (`--eval-interval`) that
always writes the best model (`always_save_checkpoint`, so the figures do not depend on whether the loss
happened to improve: the case where saving costs most). Two runs:

- old: what fakegpt did before the resume state existed: at every improving evaluation, the model AND the AdamW
  state, inline; reproduced with `--save-interval 1 --save-every-minutes 0 --background-save false` (the resume
  state, weights + optimizer, at every iteration);
- new-sync: the defaults, but the best model written before training continues (`--background-save false`);
- new: the defaults: the best model (weights only) on improvement, copied to host memory and written in a
  background thread; the resume state every 30 minutes and at the end (`--save-interval 0 --save-every-minutes
  30`).

Saving is timed on the training thread: for the resume state, the seconds in its writer; for the best model,
the writer's own count (an inline write; or, in the background, setting up the snapshot, the wait for its copy
before the next optimizer step and any wait for a write still in flight). Bytes are the sizes of what each write
left on disk; "share" is that time over the training loop's wall time (evaluations included). On a 2-core CPU
the background copy and write still compete with training for the cores, which shows in the loop time, not in
"save s": compare "loop s/iter" of new and new-sync.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fakegpt.finetune.train as train_mod  # noqa: E402
from fakegpt.finetune import state as state_mod  # noqa: E402
from fakegpt.finetune.best_model import BestModelWriter  # noqa: E402
from fakegpt.finetune.config import FinetuneConfig  # noqa: E402
from fakegpt.models.checkpoint_io import DurableFile  # noqa: E402


def folder_bytes(path: Path, links: bool = True) -> int:
    """Bytes a write put on disk. `links=False`: leave out files with other names too (the resume state's link
    to the best model's weights file was not written again)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and (links or p.stat().st_nlink == 1))


def disk_floor(nbytes: int, folder: Path, direct: bool = True) -> float:
    """Seconds this disk takes to write and fsync `nbytes` of incompressible data the way checkpoints are
    written (`DurableFile`: direct I/O; `direct=False`: through the page cache, written back as it goes): what
    any durable write of that much costs, whatever writes it."""
    block = os.urandom(64 << 20)
    path = folder / "floor.bin"
    started = time.perf_counter()
    with DurableFile(path, direct=direct) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[: min(left, len(block))])
    seconds = time.perf_counter() - started
    path.unlink()
    return seconds


def disk_profile(folder: Path, rounds: int = 5, nbytes: int = int(4.25e9), pause: float = 5.0) -> None:
    """The end of the 100-iteration run's bytes (best model + AdamW state, 4.25 GB), written durably through the
    page cache (the writer before direct I/O) and with direct I/O (now), alternately, `rounds` times."""
    print(f"disk: {nbytes / 1e9:.2f} GB written and fsync'd, page cache vs direct I/O, {rounds} alternating rounds")
    ratios = []
    for i in range(rounds):
        cached = disk_floor(nbytes, folder, direct=False)
        time.sleep(pause)  # the disk settles between writes
        direct = disk_floor(nbytes, folder, direct=True)
        time.sleep(pause)
        ratios.append(cached / direct)
        print(
            f"  round {i + 1}: page cache {cached:5.2f} s ({nbytes / cached / 1e6:,.0f} MB/s), direct {direct:5.2f} s "
            f"({nbytes / direct / 1e6:,.0f} MB/s): {cached / direct:.1f}x",
            flush=True,
        )
    ratios.sort()
    print(f"median: direct I/O {ratios[len(ratios) // 2]:.1f}x faster")


class Meter:
    """Wraps the loop's writers and the loop itself: seconds the training thread spent saving (best-model
    snapshots or inline writes, resume states), bytes each write left on disk, the loop's wall time."""

    def __init__(self) -> None:
        self.saves: list[tuple[str, float, int]] = []  # (kind, seconds on the training thread, bytes)
        self.loop_s = 0.0
        self.background_s = 0.0  # best-model copies and writes done in the background thread
        self.best_s = 0.0  # training-thread seconds spent on best-model writes (all of them)
        self.flight_s = 0.0  # ... of which waiting for a background write to finish (e.g. before the end state)
        self._orig = (BestModelWriter.submit, state_mod.write, train_mod._loop)
        self.writers: list[BestModelWriter] = []

    def __enter__(self) -> Meter:
        submit, write_state, loop = self._orig

        def timed_submit(writer, model, folder, info, *args, **kwargs):
            if writer not in self.writers:
                self.writers.append(writer)
            submit(writer, model, folder, info, *args, **kwargs)
            # seconds: the writer's own count of training-thread time, read after the loop; bytes: after the run
            self.saves.append(("best model", 0.0, 0))

        def timed_state(*args, **kwargs):
            t0 = time.perf_counter()
            waited = self.writers[-1].flight_seconds if self.writers else 0.0
            out = write_state(*args, **kwargs)
            # a wait for the best model inside the state write is the best model's (counted by its writer)
            waited = (self.writers[-1].flight_seconds if self.writers else 0.0) - waited
            self.saves.append(("resume state", time.perf_counter() - t0 - waited, folder_bytes(out, links=False)))
            return out

        def timed_loop(t, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return loop(t, *args, **kwargs)
            finally:
                self.loop_s += time.perf_counter() - t0
                # the best model's share of the training thread: inline writes, or the snapshot set-up, the
                # wait for the copy before the next optimizer step and any wait for a write still in flight
                self.best_s += t.best_writer.blocked_seconds
                self.flight_s += t.best_writer.flight_seconds
                if t.best_writer.background:
                    self.background_s += t.best_writer.write_seconds

        BestModelWriter.submit, state_mod.write, train_mod._loop = timed_submit, timed_state, timed_loop
        return self

    def __exit__(self, *exc) -> None:
        BestModelWriter.submit, state_mod.write, train_mod._loop = self._orig


def run(name: str, args: argparse.Namespace, data_dir: Path, work: Path, **flags) -> dict:
    cfg = FinetuneConfig(
        data_dir=str(data_dir),
        out_dir=str(work / name),
        init_from="scratch",
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        block_size=args.block_size,
        batch_size=1,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        max_iters=args.iters,
        eval_interval=args.eval_interval,
        eval_iters=1,
        always_save_checkpoint=True,
        device="cpu",
        dtype="float32",
        compile=False,
        seed=0,
        **flags,
    )
    with Meter() as meter:
        result = train_mod.finetune(cfg, run_name=f"bench_checkpoint {name}")
    best_bytes = folder_bytes(result.checkpoint_dir)
    n_best = sum(k == "best model" for k, _, _ in meter.saves)
    meter.saves = [
        (k, meter.best_s / n_best, best_bytes) if k == "best model" else (k, sec, b) for k, sec, b in meter.saves
    ]
    save_s = sum(s for _, s, _ in meter.saves)
    written = sum(b for _, _, b in meter.saves)

    def per_write(kind: str) -> tuple[int, float, float]:
        found = [(sec, b) for k, sec, b in meter.saves if k == kind]
        n = len(found)
        return n, (sum(s for s, _ in found) / n if n else 0.0), (sum(b for _, b in found) / n if n else 0.0)

    best_n, best_s, best_b = per_write("best model")
    state_n, state_s, state_b = per_write("resume state")
    return {
        "name": name,
        "iters": args.iters,
        "loop_s": meter.loop_s,
        "save_s": save_s,
        "bytes": written,
        "best_writes": best_n,
        "state_writes": state_n,
        "best_s": best_s,
        "state_s": state_s,
        "best_gb": best_b / 1e9,
        "state_gb": state_b / 1e9,
        "train_s": (meter.loop_s - save_s) / args.iters,  # an iteration with its evaluation, without saving
        "state_every": 1 if flags.get("save_interval") == 1 else 0,
        "background_s": meter.background_s,
        "flight_s": meter.flight_s,
        # what the end of the run must put on disk durably: the last best model and the end state
        "end_bytes": best_b * (best_n > 0) + ([b for k, _, b in meter.saves if k == "resume state"] or [0])[-1],
    }


def projected_share(r: dict, iters: int, eval_interval: int) -> float:
    """Saving time over training time for a run of `iters` iterations, from the measured per-write costs."""
    evals = iters // eval_interval + 1
    states = iters if r["state_every"] else 1
    return (evals * r["best_s"] + states * r["state_s"]) / (iters * r["train_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--n-embd", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--eval-interval", type=int, default=1, help="1: the worst case; fakegpt's default is 5")
    parser.add_argument("--project", type=int, default=100, help="iterations of the projected run")
    parser.add_argument(
        "--runs", default="old,new-sync,new", help="which of old,new-sync,new to run (new alone: a long real run)"
    )
    parser.add_argument("--data-dir", help="a prepared data folder (default: prepare the embedded demo data)")
    parser.add_argument("--work", help="folder for the runs' outputs (default: a temporary folder, removed)")
    parser.add_argument(
        "--disk", action="store_true", help="only the disk: the end's bytes through the page cache vs direct I/O"
    )
    args = parser.parse_args()
    if args.disk:
        with tempfile.TemporaryDirectory(prefix="bench_checkpoint.", dir=args.work) as tmp:
            disk_profile(Path(tmp))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint.", dir=args.work) as tmp:
        work = Path(tmp).resolve()
        data_dir = Path(args.data_dir).resolve() if args.data_dir else work / "data"
        os.chdir(work)  # MLflow's ./mlruns (a 1.4 GB best model per run) in the work folder, removed at the end
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
        if not args.data_dir:
            from fakegpt.data.prepare import PrepareConfig, prepare

            prepare(PrepareConfig(out=str(data_dir), force=True), track=False)
        flags = {
            "old": {"save_interval": 1, "save_every_minutes": 0, "background_save": False},
            "new-sync": {"background_save": False},
            "new": {},
        }
        rows = [run(name, args, data_dir, work, **flags[name]) for name in args.runs.split(",")]
        for r in rows:
            r["floor_s"] = disk_floor(int(r["end_bytes"]), work)
    n_params = args.n_layer * 12 * args.n_embd**2 + 50257 * args.n_embd + args.block_size * args.n_embd
    print(
        f"\nscratch GPT-2 {args.n_layer} layers x {args.n_head} heads x {args.n_embd} (~{n_params / 1e6:.0f} M "
        f"parameters), block {args.block_size}, {args.iters} iterations, evaluation + best model every "
        f"{args.eval_interval} iteration(s), CPU ({torch.get_num_threads()} threads)\n"
    )
    head = (
        f"{'':<8} {'best-model writes':>17} {'state writes':>12} {'GB written/iter':>15} {'save s/iter':>11} "
        f"{'loop s/iter':>11} {'save share':>10} {'background write s/iter':>23}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['name']:<8} {r['best_writes']:>17} {r['state_writes']:>12} {r['bytes'] / r['iters'] / 1e9:>15.2f} "
            f"{r['save_s'] / r['iters']:>11.2f} {r['loop_s'] / r['iters']:>11.2f} {r['save_s'] / r['loop_s']:>10.1%} "
            f"{r['background_s'] / r['iters']:>23.2f}"
        )
    print(
        f"\nper write: {'':<3} {'best model: s (on the training thread)':>38} {'GB':>5} {'state: s':>9} {'GB':>5}   "
        f"projected save share, {args.project} iterations"
    )
    for r in rows:
        print(
            f"{r['name']:<14} {r['best_s']:>38.2f} {r['best_gb']:>5.2f} {r['state_s']:>9.2f} {r['state_gb']:>5.2f}   "
            f"{projected_share(r, args.project, args.eval_interval):>8.1%} (eval every {args.eval_interval}), "
            f"{projected_share(r, args.project, 5):.1%} (every 5, the default)"
        )
    print(
        "\nthe end of a run, and the floor it sets: the last best model and the end state must be on disk "
        "(fsync) before the run is done;\nthis disk writes and fsyncs that many incompressible bytes in:"
    )
    for r in rows:
        print(
            f"{r['name']:<14} {r['end_bytes'] / 1e9:.2f} GB in {r['floor_s']:.2f} s = {r['floor_s'] / r['loop_s']:.1%} "
            f"of the loop (saving took {r['save_s'] / r['loop_s']:.1%}; of the best model's "
            f"{r['best_s'] * r['best_writes']:.2f} s on the training thread, {r['flight_s']:.2f} s waited for a "
            "write in flight)"
        )
    print(
        "\nold: resume state (weights + AdamW) at every iteration and the best model written inline "
        "(--save-interval 1 --save-every-minutes 0 --background-save false); new-sync: defaults but "
        "--background-save false; new: defaults (best model from a host copy in a background thread, resume state "
        "every 30 min and at the end). save s/iter: time the training thread spent saving."
    )


if __name__ == "__main__":
    main()
