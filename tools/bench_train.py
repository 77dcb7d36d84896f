"""Training-step throughput on the CPU: fakegpt's finetune step vs. untuned transformers vs. nanoGPT, side by side.

    python tools/bench_train.py                        # fakegpt vs. transformers' stock GPT-2 step
    python tools/bench_train.py --nanogpt /tmp/nanoGPT # ... and karpathy/nanoGPT's model.py from a checkout
                                                       # outside this repository (none of its code is shipped)

A scratch model of 4 layers, 4 heads, 256 embedding, block 128, micro-batch 8, fp32 (the sizes of issue 3),
one micro-batch per optimizer step, AdamW (weight decay 0.1, betas 0.9/0.95), gradient clipping at 1.0.
Contenders run in interleaved rounds so that noise from other work on the machine hits all of them alike;
the table gives the median tokens/s per contender and the ratios. The step timed for fakegpt is the one
`fakegpt finetune` runs (fakegpt.finetune.train.accumulate + update on the model it builds), batches included.
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

from fakegpt.finetune.batches import Batches  # noqa: E402
from fakegpt.finetune.config import FinetuneConfig  # noqa: E402
from fakegpt.finetune.train import _load, _Objective, _optimizer, accumulate, update  # noqa: E402
from fakegpt.models.loading import scratch_model  # noqa: E402

N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 256, 128, 8
LR, WD, BETAS, CLIP = 6e-4, 0.1, (0.9, 0.95), 1.0


def token_data(data_dir: str | None) -> np.ndarray:
    """Token ids to draw windows from: a prepared train.bin, or random GPT-2 ids (speed does not depend on them)."""
    if data_dir:
        return np.memmap(Path(data_dir) / "train.bin", dtype=np.uint16, mode="r")
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


def fakegpt_step(data: np.ndarray) -> Callable[[], None]:
    cfg = FinetuneConfig(
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
    model = _load(cfg, "scratch", device)
    model.train()
    objective = _Objective(model, fused=True)
    optimizer = _optimizer(model, cfg, device)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", help="folder holding nanoGPT's model.py (a checkout outside this repo)")
    parser.add_argument("--data-dir", help="a prepared data folder (train.bin); default: random token ids")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = token_data(args.data_dir)
    contenders: dict[str, Callable[[], None]] = {"fakegpt": fakegpt_step(data), "transformers": transformers_step(data)}
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
    base = "nanogpt" if "nanogpt" in median else "transformers"
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
