#!/usr/bin/env bash
# GPU check: tokens/s, MFU and peak memory of `fakegpt finetune` on this card for
#   gpt2-medium full bf16 + compile | gpt2-xl full | gpt2-xl full + adamw8bit + gradient checkpointing | gpt2-xl LoRA
#   | llama 1B full bf16 | llama 7B QLoRA (4-bit NF4 base) + gradient checkpointing
# with scratch models of the real shapes (random init) on random tokens: no network, no downloads.
# Prints one Markdown table (with the card's name, the date and --plan's estimate per row) on stdout;
# progress and each run's log path on stderr. Under 8 minutes on one H100/H200 (a run is not started after 450 s).
#   bash tools/gpu_check.sh                 # on the GPU
#   bash tools/gpu_check.sh --tiny          # the same pipeline on the CPU, 2-layer model (what the test runs)
#   bash tools/gpu_check.sh --work DIR      # keep data, runs, logs and the MLflow store in DIR
#   PYTHON=/path/to/python bash tools/gpu_check.sh   # another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" tools/gpu_check.py "$@"
