"""tools/gpu_check.sh end to end on the CPU (`--tiny`): random-token data, one finetune process per configuration,
figures read back from each run's metrics.jsonl, one Markdown table."""

from __future__ import annotations

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
    ]
    for row in rows[:3]:  # measured: tokens/s from metrics.jsonl, the plan's estimate beside it
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "2 x 32" and float(cells[2].replace(",", "")) > 0 and float(cells[6]) > 0
        assert cells[3] == "n/a"  # no MFU and no GPU memory on the CPU: never made up
    lora = [c.strip() for c in rows[3].strip("|").split("|")]
    assert re.fullmatch(r"[\d,]+", lora[2]) or lora[2].startswith(("not measured", "failed"))
    # the random-token data folder is a valid prepared folder
    assert (tmp_path / "data" / "meta.json").is_file() and (tmp_path / "data" / "train.bin").stat().st_size > 0
