"""Tokens/s, MFU and peak GPU memory of `fakegpt finetune` for GPT-2 and Llama shapes, as one Markdown table.

    bash tools/gpu_check.sh                  # on the GPU: four configurations, under 8 minutes on one H100/H200
    python tools/gpu_check.py --tiny         # the same pipeline on the CPU with a 2-layer model (tests, demos)

No network and no downloads: the models are made from scratch (random init) in the real shapes (gpt2-medium
24 layers / 16 heads / 1024 embd, gpt2-xl 48 / 25 / 1600; Llama 3.2 1B and Llama 2 7B, saved as model folders
first, on GPT-2's vocabulary), and the data is a folder of random GPT-2 token ids with
a valid meta.json. Each configuration is one `python -m fakegpt finetune --init-from scratch ...` process; its
OUT/metrics.jsonl gives train/tokens_per_s and mfu (medians over the second half of the iterations, after
compilation and warm-up) and gpu/peak_memory_gb / gpu/peak_memory_reserved_gb (the maximum). Beside each
measurement the table shows `fakegpt finetune --plan`'s estimate for the same configuration.

The LoRA row is checked to be LoRA: a run that fails, or that is not tagged fakegpt.method=lora in MLflow, is shown
as not measured rather than with figures of some other training.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fakegpt.data.meta import DatasetMeta  # noqa: E402
from fakegpt.data.tokenizer import VOCAB_SIZE  # noqa: E402
from fakegpt.tracking import TAG_METHOD  # noqa: E402  (tracking imports MLflow only when it logs)


@dataclasses.dataclass(frozen=True)
class Check:
    """One row: a name and the finetune flags that differ from the common ones."""

    name: str
    shape: tuple[int, int, int]  # n_layer, n_head, n_embd (a scratch GPT-2)
    batch_size: int
    flags: tuple[str, ...] = ()
    lora: bool = False
    model: tuple[tuple[str, int], ...] = ()  # another architecture: its config, built as a random-init folder
    method: str = "full"  # what the run's fakegpt.method tag must say (lora, qlora) for the row to count


MEDIUM, XL = (24, 16, 1024), (48, 25, 1600)
# Llama-architecture shapes (Llama 3.2 1B, Llama 2 7B), on GPT-2's vocabulary so the random GPT-2 bins train them
LLAMA_1B = tuple(
    dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
    ).items()
)  # fmt: skip
LLAMA_7B = tuple(
    dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=2048, tie_word_embeddings=False,
    ).items()
)  # fmt: skip
CHECKS = (
    Check("gpt2-medium full, bf16 + compile", MEDIUM, 8, ("--compile", "true")),
    Check("gpt2-xl full", XL, 4, ("--compile", "false")),
    Check(
        "gpt2-xl full, adamw8bit + checkpointing",
        XL,
        1,
        ("--compile", "false", "--optimizer", "adamw8bit", "--gradient-checkpointing", "true"),
    ),
    Check("gpt2-xl LoRA r=8", XL, 4, ("--compile", "false", "--method", "lora"), lora=True),
    Check("llama 1B full, bf16", XL, 4, ("--compile", "false"), model=LLAMA_1B),
    Check(
        "llama 7B QLoRA r=8 + checkpointing",
        XL,
        1,
        ("--compile", "false", "--method", "qlora", "--gradient-checkpointing", "true"),
        lora=True,
        model=LLAMA_7B,
        method="qlora",
    ),
)
TINY_SHAPE = (2, 2, 64)
TINY_LLAMA = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def make_data(folder: Path, train_tokens: int, val_tokens: int, seed: int = 0) -> Path:
    """A data folder of uniformly random GPT-2 ids (uint16 bins) with a meta.json that finetune accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        rng.integers(0, VOCAB_SIZE, size=n, dtype=np.uint16).tofile(folder / f"{split}.bin")
    DatasetMeta(
        dataset="gpu-check-random",
        encoding="gpt2",
        vocab_size=VOCAB_SIZE,
        eot_token=VOCAB_SIZE - 1,
        dtype="uint16",
        train_tokens=train_tokens,
        val_tokens=val_tokens,
        train_messages=0,
        val_messages=0,
        dropped={},
        read={},
        sources=[],
        mixture={},
        max_train_tokens_reached=None,
        mixture_val={},
        spelling={},
        split={},
        timing={},
        config={"generator": "tools/gpu_check.py", "seed": seed},
        fakegpt_version="gpu-check",
    ).write(folder)
    return folder


def make_model(check: Check, folder: Path, tiny: bool) -> Path:
    """A random-init model folder of `check.model`'s shape (bf16 on the GPU; the tiny shape on the CPU), once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {**dict(check.model), **(TINY_LLAMA if tiny else {})}
    config = AutoConfig.for_model(**{**shape, "vocab_size": VOCAB_SIZE, "bos_token_id": VOCAB_SIZE - 1})
    device, dtype = ("cpu", torch.float32) if tiny else ("cuda", torch.bfloat16)
    with torch.device(device):  # initialised where it is made: a 7B model in seconds on the GPU
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    return folder


def finetune_args(check: Check, data: Path, out: Path, iters: int, tiny: bool, model: Path | None = None) -> list[str]:
    n_layer, n_head, n_embd = TINY_SHAPE if tiny else check.shape
    block = 32 if tiny else 1024
    scratch = ("--n-layer", str(n_layer), "--n-head", str(n_head), "--n-embd", str(n_embd))
    return [
        *(("--init-from", str(model)) if model is not None else ("--init-from", "scratch", *scratch)),
        *("--block-size", str(block), "--batch-size", str(2 if tiny else check.batch_size)),
        *("--gradient-accumulation-steps", "1", "--max-iters", str(iters), "--log-interval", "1"),
        # evaluation only at the start and the end, on 2 batches; no resume state
        *("--eval-interval", str(iters), "--eval-iters", "2", "--save-state", "false"),
        *("--data-dir", str(data), "--out-dir", str(out), "--learning-rate", "1e-4"),
        *(("--device", "cpu", "--dtype", "float32") if tiny else ("--device", "cuda", "--dtype", "bfloat16")),
        *[
            ("false" if tiny and f == "true" and prev == "--compile" else f)
            for prev, f in zip(("",) + check.flags, check.flags, strict=False)
        ],
    ]


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.jsonl as key -> values in step order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        point = json.loads(line)
        for key, value in point.items():
            if key not in ("step", "timestamp") and isinstance(value, int | float):
                series.setdefault(key, []).append((point["step"], float(value)))
    return {k: [v for _, v in sorted(points)] for k, points in series.items()}


def summarize(series: dict[str, list[float]]) -> dict[str, float | None]:
    """Steady-state medians (second half of the iterations) and peaks."""

    def steady(key: str) -> float | None:
        values = series.get(key) or []
        return statistics.median(values[len(values) // 2 :]) if values else None

    def peak(key: str) -> float | None:
        values = series.get(key) or []
        return max(values) if values else None

    return {
        "tokens_per_s": steady("train/tokens_per_s"),
        "mfu": steady("mfu"),
        "peak_gb": peak("gpu/peak_memory_gb"),
        "reserved_gb": peak("gpu/peak_memory_reserved_gb"),
    }


def plan_gib(args: list[str]) -> float | None:
    """`--plan`'s total for the same flags, GiB (in-process: no weights, a meta-device model)."""
    from fakegpt import config as config_mod
    from fakegpt.finetune import plan
    from fakegpt.finetune.config import FinetuneConfig

    try:
        cfg, _ = config_mod.parse_given(FinetuneConfig, [*args, "--plan"], prog="gpu_check")
        return plan.plan(cfg, world_size=1).memory.total / plan.GIB
    except Exception:  # noqa: BLE001 - a plan that cannot be made is shown as n/a, the measurement still counts
        return None


def run_tag(db: Path, run_id: str, key: str) -> str | None:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id).data.tags.get(key)


def run_check(check: Check, data: Path, work: Path, iters: int, tiny: bool, timeout: float) -> dict:
    out = work / check.name.replace(" ", "_").replace(",", "").replace("+", "").replace("=", "")
    model = make_model(check, work / f"model-{out.name}", tiny) if check.model else None
    args = finetune_args(check, data, out, iters, tiny, model)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = work / f"{out.name}.log"
    row = {"name": check.name, "batch": args[args.index("--batch-size") + 1], "plan_gib": plan_gib(args)}
    row["block"] = args[args.index("--block-size") + 1]
    try:
        with log.open("w") as fh:
            command = [sys.executable, "-m", "fakegpt", "finetune", *args]
            # cwd: the run's MLflow artifacts (./mlruns; the best model, 6 GB at gpt2-xl) stay in `work`
            proc = subprocess.run(command, env=env, stdout=fh, stderr=fh, timeout=timeout, cwd=work)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"not measured: over its {timeout:.0f} s; log {log}"}
    finally:
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # gpt2-xl: 6 GB per run, never read here
    if proc.returncode != 0:
        last = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["?"]
        return {**row, "status": f"failed (exit {proc.returncode}): {last[0][:120]}; log {log}"}
    if check.lora:
        run_id = next(
            (ln.rsplit("MLflow run ", 1)[1].strip() for ln in log.read_text().splitlines() if "MLflow run " in ln), None
        )
        method = "qlora" if check.method == "qlora" else "lora"
        if run_id is None or run_tag(work / "mlflow.db", run_id, TAG_METHOD) != method:
            return {
                **row,
                "status": f"not measured: this build does not train --method {method} (no {TAG_METHOD}={method})",
            }
    return {**row, **summarize(read_metrics(out / "metrics.jsonl")), "status": "ok"}


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict], card: str, iters: int) -> str:
    lines = [
        f"GPU check on {card}, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; scratch models (random init), random "
        f"tokens, {iters} iterations each, accumulation 1; medians of the second half, peak = max over the run.",
        "",
        "| configuration | micro-batch x block | tokens/s | MFU | peak allocated (GiB) | peak reserved (GiB) | "
        "--plan estimate (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    gib = 1e9 / 2**30  # the metrics are in GB (1e9 bytes); the plan speaks GiB
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['name']} | {r['batch']} x {r['block']} | {r['status']} | | | | {_fmt(r['plan_gib'], '.2f')} |"
            )
            continue
        peak = None if r["peak_gb"] is None else r["peak_gb"] * gib
        reserved = None if r["reserved_gb"] is None else r["reserved_gb"] * gib
        mfu = None if r["mfu"] is None else 100 * r["mfu"]
        lines.append(
            f"| {r['name']} | {r['batch']} x {r['block']} | {_fmt(r['tokens_per_s'], ',.0f')} | "
            f"{_fmt(mfu, '.1f')}{'%' if mfu is not None else ''} | {_fmt(peak, '.1f')} | {_fmt(reserved, '.1f')} | "
            f"{_fmt(r['plan_gib'], '.2f')} |"
        )
    return "\n".join(lines)


def card_name(tiny: bool) -> str:
    if tiny:
        return "the CPU (--tiny: 2 layers / 2 heads / 64 embd, block 32, fp32)"
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --tiny for the CPU pipeline check")
    return torch.cuda.get_device_name(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="CPU, 2-layer model: checks the pipeline, not a GPU")
    parser.add_argument("--iters", type=int, default=None, help="iterations per configuration (GPU 30, tiny 6)")
    parser.add_argument("--work", default=None, help="folder for data, runs and logs (default: a temporary one)")
    parser.add_argument("--only", action="append", default=None, help="run only checks whose name has this")
    parser.add_argument(
        "--budget", type=float, default=450.0, help="seconds for all runs: a run is not started past it (GPU 450)"
    )
    parser.add_argument("--run-timeout", type=float, default=150.0, help="seconds one configuration may take")
    args = parser.parse_args(argv)
    iters = args.iters or (6 if args.tiny else 30)
    card = card_name(args.tiny)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.work or tmp).resolve()  # absolute: each run's working folder is `work`
        work.mkdir(parents=True, exist_ok=True)
        data = make_data(work / "data", 200_000 if args.tiny else 4_000_000, 50_000 if args.tiny else 400_000)
        checks = [c for c in CHECKS if not args.only or any(o in c.name for o in args.only)]
        rows, started = [], time.monotonic()
        for check in checks:
            left = args.budget - (time.monotonic() - started)
            if left < 30 and not args.tiny:
                rows.append({"name": check.name, "batch": "", "block": "", "plan_gib": None, "status": "skipped: time"})
                continue
            print(f"gpu_check: {check.name} ...", file=sys.stderr, flush=True)
            timeout = args.run_timeout if args.tiny else min(args.run_timeout, left)
            rows.append(run_check(check, data, work, iters, args.tiny, timeout))
        print(table(rows, card, iters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
