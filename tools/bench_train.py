"""Training-step throughput on the CPU: fakegpt's finetune step vs. untuned transformers vs. nanoGPT, side by side.

    python tools/bench_train.py                        # fakegpt vs. transformers' stock GPT-2 step
    python tools/bench_train.py --nanogpt /tmp/nanoGPT # ... and karpathy/nanoGPT's model.py from a checkout
                                                       # outside this repository (none of its code is shipped)
    python tools/bench_train.py --logging              # what --log-interval 1 costs a whole `finetune` run
    python tools/bench_train.py --lora                 # fakegpt's full fine-tune step vs. its --method lora step

`--logging` times the `fakegpt finetune` command path itself (`finetune()` with its MLflow run) on a 2-layer
scratch model over the embedded demo data: --log-interval 1 against logging only at the end, in interleaved
rounds, against the SQLite store or `--tracking-uri` (a server). Metrics go through the background
MetricLogger, so a slow or remote store should not slow the training loop.

A scratch model of 4 layers, 4 heads, 256 embedding, block 128, micro-batch 8, fp32,
one micro-batch per optimizer step, AdamW (weight decay 0.1, betas 0.9/0.95), gradient clipping at 1.0.
Contenders run in interleaved rounds so that noise from other work on the machine hits all of them alike;
the table gives the median tokens/s per contender and the ratios. The step timed for fakegpt is the one
`fakegpt finetune` runs (fakegpt.finetune.train.accumulate + update on the model it builds), batches included.
`--lora` times that step for `--method full` and `--method lora` (rank 8, alpha 16, dropout 0.05 on c_attn,
c_proj, c_fc: the defaults) on the same model, side by side; the ratio is lora/full.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fakegpt.data.bins import bin_dtype  # noqa: E402
from fakegpt.finetune.batches import Batches  # noqa: E402
from fakegpt.finetune.config import FinetuneConfig  # noqa: E402
from fakegpt.finetune.setup import build_optimizer, load  # noqa: E402
from fakegpt.finetune.step import Objective, accumulate, update  # noqa: E402
from fakegpt.models.loading import scratch_model  # noqa: E402

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 256, 128, 8
LR, WD, BETAS, CLIP = 6e-4, 0.1, (0.9, 0.95), 1.0


def token_data(data_dir: str | None) -> np.ndarray:
    """Token ids to draw windows from: a prepared train.bin, or random GPT-2 ids (speed does not depend on them)."""
    if data_dir:
        return np.memmap(Path(data_dir) / "train.bin", dtype=bin_dtype(data_dir), mode="r")
    return np.random.default_rng(0).integers(0, 50257, size=1_000_000, dtype=np.uint16)


def plain_batches(data: np.ndarray, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """nanoGPT's get_batch on the CPU: random windows stacked into (B, T) int64 tensors."""
    gen = torch.Generator().manual_seed(seed)

    def get() -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(data) - BLOCK, (BATCH,), generator=gen)
        x = torch.stack([torch.from_numpy(data[i : i + BLOCK].astype(np.int64)) for i in ix.tolist()])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + BLOCK].astype(np.int64)) for i in ix.tolist()])
        return x, y

    return get


def fakegpt_step(data: np.ndarray, method: str = "full", lora_dropout: float = 0.05) -> Callable[[], None]:
    cfg = FinetuneConfig(
        method=method,
        lora_dropout=lora_dropout,
        init_from="scratch",
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_embd=N_EMBD,
        block_size=BLOCK,
        batch_size=BATCH,
        gradient_accumulation_steps=1,
        learning_rate=LR,
        weight_decay=WD,
        beta1=BETAS[0],
        beta2=BETAS[1],
        grad_clip=CLIP,
        device="cpu",
        dtype="float32",
        seed=0,
    )
    device = torch.device("cpu")
    model = load(cfg, "scratch", device)
    model.train()
    objective = Objective(model, fused=True)
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = Batches(data, BATCH, BLOCK, device, seed=0)
    autocast = torch.autocast("cpu", enabled=False)

    def step() -> None:
        accumulate(objective, batches, 1, autocast, scaler)
        update(model, optimizer, scaler, CLIP)

    return step


def transformers_step(data: np.ndarray) -> Callable[[], None]:
    """transformers' GPT-2 used the obvious way: model(input_ids, labels=...).loss, stock AdamW."""
    torch.manual_seed(0)
    model = scratch_model(N_LAYER, N_HEAD, N_EMBD, BLOCK)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, weight_decay=WD)
    get = plain_batches(data, 0)

    def step() -> None:
        x, _ = get()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def nanogpt_step(path: str, data: np.ndarray) -> Callable[[], None]:
    """karpathy/nanoGPT's model.py (loaded from a checkout outside this repo) with train.py's settings:
    bias=False, vocabulary padded to 50,304, configure_optimizers, the same step as its training loop."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path) / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    conf = module.GPTConfig(
        block_size=BLOCK, vocab_size=50304, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, dropout=0.0, bias=False
    )
    model = module.GPT(conf)
    model.train()
    optimizer = model.configure_optimizers(WD, LR, BETAS, "cpu")
    get = plain_batches(data, 0)

    def step() -> None:
        x, y = get()
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def logging_cost(rounds: int, iters: int, tracking_uri: str | None) -> int:
    """Seconds of a whole finetune() with --log-interval 1 vs. logging only the last iteration, side by side."""
    import os
    import shutil
    import tempfile

    from fakegpt import tracking
    from fakegpt.data.prepare import PrepareConfig, prepare
    from fakegpt.finetune.train import finetune

    work = Path(tempfile.mkdtemp(prefix="bench-logging-"))
    os.chdir(work)  # MLflow's ./mlruns (the runs' artifacts) in the work folder, removed at the end
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri or f"sqlite:///{work}/mlflow.db"
    prepare(PrepareConfig(out=str(work / "data")), track=False)
    base = dict(
        data_dir=str(work / "data"),
        init_from="scratch",
        n_layer=2,
        n_head=2,
        n_embd=64,
        block_size=64,
        batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        max_iters=iters,
        eval_interval=iters,
        eval_iters=2,
        save_state=False,
        seed=0,
    )
    variants = {"log every iteration": 1, "log at the end only": 10**9}
    times: dict[str, list[float]] = {name: [] for name in variants}
    # Logging's own CPU time, read from each run's MetricLogger as it closes: seconds in log() on the training
    # thread + the sender thread's CPU seconds. Their sum bounds what logging can take from training, and unlike
    # the difference of two wall times it is not drowned by the machine's round-to-round noise.
    own: list[float] = []
    close = tracking.MetricLogger.close

    def measured_close(self: tracking.MetricLogger) -> int:
        unsent = close(self)
        own.append(self.log_seconds + self.sender_cpu_seconds)
        return unsent

    # a spy on the real method, for this benchmark process only: each run's logging cost, measured at close
    tracking.MetricLogger.close = measured_close  # type: ignore[method-assign]
    bounds: list[float] = []  # per --log-interval 1 run: logging's own CPU seconds / the run's wall seconds
    finetune(FinetuneConfig(**base, out_dir=str(work / "warmup"), log_interval=1))  # imports, store migrations
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            started = time.perf_counter()
            own.clear()
            finetune(FinetuneConfig(**base, out_dir=str(work / f"{r}-{variants[name]}"), log_interval=variants[name]))
            times[name].append(time.perf_counter() - started)
            if variants[name] == 1:
                bounds.append(own[-1] / times[name][-1])
    print(
        f"finetune() end to end, 2 layers / 64 embd, block 64, micro-batch 4, {iters} iterations, "
        f"store {os.environ['MLFLOW_TRACKING_URI'].split('://')[0]}; {rounds} interleaved rounds"
    )
    for name, values in times.items():
        print(
            f"  {name:22s} median {statistics.median(values):6.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in values)})"
        )
    paired = [a / b - 1 for a, b in zip(times["log every iteration"], times["log at the end only"], strict=True)]
    print(
        f"  cost of --log-interval 1: {100 * statistics.median(paired):+.1f}% (median of per-round differences; "
        f"range {100 * min(paired):+.1f}% .. {100 * max(paired):+.1f}%)"
    )
    print(
        f"  logging's own CPU time with --log-interval 1 (log() calls + the sender thread): "
        f"{100 * statistics.median(bounds):.2f}% of the run (median; range {100 * min(bounds):.2f}% .. "
        f"{100 * max(bounds):.2f}%): an upper bound on its cost, target < 2%"
    )
    shutil.rmtree(work, ignore_errors=True)  # runs, checkpoints and the store of every round
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", help="folder holding nanoGPT's model.py (a checkout outside this repo)")
    parser.add_argument("--data-dir", help="a prepared data folder (train.bin); default: random token ids")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--lora", action="store_true", help="fakegpt --method full vs. --method lora")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="--lora: the adapters' dropout (default 0.05)")
    parser.add_argument("--logging", action="store_true", help="time --log-interval 1 against logging at the end")
    parser.add_argument("--iters", type=int, default=300, help="--logging: iterations per finetune run")
    parser.add_argument("--tracking-uri", help="--logging: a tracking server URI (default: a fresh SQLite store)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.logging:
        return logging_cost(args.rounds if args.rounds != 15 else 3, args.iters, args.tracking_uri)

    data = token_data(args.data_dir)
    contenders: dict[str, Callable[[], None]] = {"fakegpt": fakegpt_step(data), "transformers": transformers_step(data)}
    if args.lora:
        contenders = {"fakegpt full": fakegpt_step(data), "fakegpt lora": fakegpt_step(data, "lora", args.lora_dropout)}
    if args.nanogpt:
        contenders["nanogpt"] = nanogpt_step(args.nanogpt, data)
    for step in contenders.values():
        for _ in range(args.warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    tokens = args.steps * BATCH * BLOCK
    for r in range(args.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))  # alternate who goes first
        for name in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                contenders[name]()
            rates[name].append(tokens / (time.perf_counter() - started))

    print(
        f"CPU training step, {N_LAYER} layers / {N_HEAD} heads / {N_EMBD} embd, block {BLOCK}, micro-batch {BATCH}, "
        f"fp32, {args.threads} threads, torch {torch.__version__}; {args.rounds} rounds x {args.steps} steps"
    )
    median = {name: statistics.median(v) for name, v in rates.items()}
    for name, values in rates.items():
        spread = f"{min(values):8.0f} .. {max(values):8.0f}"
        print(f"  {name:13s} {median[name]:8.0f} tokens/s  (rounds: {spread})")
    # Ratios of the same round's numbers (which share the machine's load at that moment), then their median:
    # far steadier than a ratio of medians on a machine that other work is using.
    base = "nanogpt" if "nanogpt" in median else "fakegpt full" if args.lora else "transformers"
    for name in median:
        if name != base:
            paired = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
            print(
                f"  {name}/{base}: {statistics.median(paired):.3f} (median of per-round ratios; "
                f"range {min(paired):.3f} .. {max(paired):.3f})"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
