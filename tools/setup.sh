#!/usr/bin/env bash
# Create .venv and install fakegpt with its test tools. Safe to re-run.
# torch: on a machine without an NVIDIA GPU we install torch==2.13.0 first (on the fakegpt dev machines a
# CPU wheel of it lies on disk; elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to get
# the CPU build), so that fakegpt's `torch>=2.4` requirement is already met and no multi-GB CUDA build is
# pulled. With a GPU, PyPI's default (CUDA) torch is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv/bin/pip install -q --disable-pip-version-check torch
  else
    .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  fi
fi
.venv/bin/pip install -q --disable-pip-version-check -e ".[dev,postgres,enelvo,metrics,lowmem,slurm]"
.venv/bin/python -c "import fakegpt, torch; print('fakegpt', fakegpt.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
