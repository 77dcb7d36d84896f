"""What saving costs a fine-tune: bytes written and seconds spent saving per iteration, old behaviour vs. new defaults.

    python tools/bench_checkpoint.py                     # gpt2-medium shape (24 x 16 x 1024), 5 iterations each
    python tools/bench_checkpoint.py --iters 3 --block-size 32 --n-layer 12 --n-head 12 --n-embd 768   # gpt2 shape

A scratch model trains on the CPU through `fakegpt.finetune.train.finetune` itself (block 64, micro-batch 1, no
accumulation, one evaluation batch) with an evaluation at every iteration that always writes the best model
(`--always-save-checkpoint true`: the run "improves every time", the case where saving costs most). Two runs:

- old: what fakegpt did before the resume state existed: at every improving evaluation, the model AND the AdamW
  state; reproduced with `--save-interval 1` (the resume state, weights + optimizer, at every iteration);
- new: the defaults: the best model (weights only) on improvement, the resume state every 30 minutes and at the
  end (`--save-interval 0 --save-every-minutes 30`).

Saving is timed by wrapping the two writers (best model, resume state) the loop calls; bytes are the sizes of
what each write left on disk; "share" is saving time over the training loop's wall time (evaluations included).
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
from fakegpt.finetune.config import FinetuneConfig  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Meter:
    """Wraps the loop's two writers and the loop itself: seconds and bytes of every save, wall time of the loop."""

    def __init__(self) -> None:
        self.saves: list[tuple[str, float, int]] = []  # (kind, seconds, bytes)
        self.loop_s = 0.0
        self._orig = (train_mod.save_checkpoint, state_mod.write, train_mod._loop)

    def __enter__(self) -> Meter:
        save_checkpoint, write_state, loop = self._orig

        def timed_checkpoint(model, folder, info=None):
            t0 = time.perf_counter()
            out = save_checkpoint(model, folder, info)
            self.saves.append(("best model", time.perf_counter() - t0, folder_bytes(folder)))
            return out

        def timed_state(*args, **kwargs):
            t0 = time.perf_counter()
            out = write_state(*args, **kwargs)
            self.saves.append(("resume state", time.perf_counter() - t0, folder_bytes(out)))
            return out

        def timed_loop(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return loop(*args, **kwargs)
            finally:
                self.loop_s += time.perf_counter() - t0

        train_mod.save_checkpoint, state_mod.write, train_mod._loop = timed_checkpoint, timed_state, timed_loop
        return self

    def __exit__(self, *exc) -> None:
        train_mod.save_checkpoint, state_mod.write, train_mod._loop = self._orig


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
        eval_interval=1,
        eval_iters=1,
        always_save_checkpoint=True,
        device="cpu",
        dtype="float32",
        compile=False,
        seed=0,
        **flags,
    )
    with Meter() as meter:
        train_mod.finetune(cfg, run_name=f"bench_checkpoint {name}")
    save_s = sum(s for _, s, _ in meter.saves)
    written = sum(b for _, _, b in meter.saves)
    kinds = {k: sum(1 for kk, _, _ in meter.saves if kk == k) for k in ("best model", "resume state")}
    return {
        "name": name,
        "iters": args.iters,
        "loop_s": meter.loop_s,
        "save_s": save_s,
        "bytes": written,
        "best_writes": kinds["best model"],
        "state_writes": kinds["resume state"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=24)
    parser.add_argument("--n-head", type=int, default=16)
    parser.add_argument("--n-embd", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--data-dir", help="a prepared data folder (default: prepare the embedded demo data)")
    parser.add_argument("--work", help="folder for the runs' outputs (default: a temporary folder, removed)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench_checkpoint.", dir=args.work) as tmp:
        work = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
        data_dir = Path(args.data_dir) if args.data_dir else work / "data"
        if not args.data_dir:
            from fakegpt.data.prepare import PrepareConfig, prepare

            prepare(PrepareConfig(out=str(data_dir), force=True), track=False)
        rows = [
            run("old", args, data_dir, work, save_interval=1, save_every_minutes=0),
            run("new", args, data_dir, work),
        ]
    n_params = args.n_layer * 12 * args.n_embd**2 + 50257 * args.n_embd + args.block_size * args.n_embd
    print(
        f"\nscratch GPT-2 {args.n_layer} layers x {args.n_head} heads x {args.n_embd} (~{n_params / 1e6:.0f} M "
        f"parameters), block {args.block_size}, {args.iters} iterations, evaluation + best model at every "
        f"iteration, CPU ({torch.get_num_threads()} threads)\n"
    )
    head = (
        f"{'':<5} {'best-model writes':>17} {'state writes':>12} {'GB written/iter':>15} {'save s/iter':>11} "
        f"{'loop s/iter':>11} {'save share':>10}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['name']:<5} {r['best_writes']:>17} {r['state_writes']:>12} {r['bytes'] / r['iters'] / 1e9:>15.2f} "
            f"{r['save_s'] / r['iters']:>11.2f} {r['loop_s'] / r['iters']:>11.2f} {r['save_s'] / r['loop_s']:>10.1%}"
        )


if __name__ == "__main__":
    main()
