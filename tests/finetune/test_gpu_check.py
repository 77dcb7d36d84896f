"""tools/gpu_check.sh end to end on the CPU (`--tiny`): random-token data, one finetune process per configuration,
figures read back from each run's metrics.jsonl, one Markdown table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_tiny_prints_one_table_with_measured_rows(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "tools/gpu_check.sh", "--tiny", "--iters", "4", "--work", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "configuration" not in line]
    assert proc.stdout.startswith("GPU check on the CPU (--tiny")
    assert [r.split(" | ")[0] for r in rows] == [
        "| gpt2-medium full, bf16 + compile",
        "| gpt2-xl full",
        "| gpt2-xl full, adamw8bit + checkpointing",
        "| gpt2-xl LoRA r=8",
        "| llama 1B full, bf16",
        "| llama 7B QLoRA r=8 + checkpointing",
    ]
    for row in rows[:3] + rows[4:]:  # measured: tokens/s from metrics.jsonl, the plan's estimate beside it
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2 x 32" and float(cells[2].replace(",", "")) > 0 and float(cells[6]) > 0
        assert cells[3] == "n/a"  # no MFU and no GPU memory on the CPU: never made up
    lora = [c.strip() for c in rows[3].strip("|").split("|")]
    assert re.fullmatch(r"[\d,]+", lora[2]) or lora[2].startswith(("not measured", "failed"))
    # the random-token data folder is a valid prepared folder
    assert (tmp_path / "data" / "meta.json").is_file() and (tmp_path / "data" / "train.bin").stat().st_size > 0


def test_gpu_rows_are_read_from_metrics_jsonl_and_formatted(tmp_path, monkeypatch):
    """The GPU-only parts (MFU, peak memory) from a metrics.jsonl as finetune writes it on CUDA."""
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import gpu_check

    from fakegpt import tracking
    from fakegpt.data.meta import DatasetMeta

    data = gpu_check.make_data(tmp_path / "data", 5000, 1000)
    assert DatasetMeta.load(data).train_tokens == 5000 and (data / "val.bin").stat().st_size == 2000
    lines = [
        {
            "step": i,
            "timestamp": 0,
            tracking.M_TRAIN_TOKENS_PER_S: tps,
            tracking.M_MFU: mfu,
            tracking.M_GPU_MEM: mem,
            tracking.M_GPU_MEM_RESERVED: mem + 1,
        }
        for i, (tps, mfu, mem) in enumerate(
            [(10.0, 0.1, 5.0), (1000.0, 0.4, 20.0), (1200.0, 0.5, 21.0), (1100.0, 0.45, 19.0)], 1
        )
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = gpu_check.summarize(gpu_check.read_metrics(tmp_path / "metrics.jsonl"))
    assert summary == {"tokens_per_s": 1150.0, "mfu": 0.475, "peak_gb": 21.0, "reserved_gb": 22.0}
    row = {"name": "gpt2-xl full", "batch": "4", "block": "1024", "plan_gib": 37.5, "status": "ok", **summary}
    skipped = {"name": "gpt2-xl LoRA r=8", "batch": "4", "block": "1024", "plan_gib": 20.1, "status": "not measured: x"}
    text = gpu_check.table([row, skipped], "NVIDIA H200", 30)
    assert text.startswith("GPU check on NVIDIA H200")
    assert "| gpt2-xl full | 4 x 1024 | 1,150 | 47.5% | 19.6 | 20.5 | 37.50 |" in text  # 21 GB = 19.6 GiB
    assert "| gpt2-xl LoRA r=8 | 4 x 1024 | not measured: x |" in text
