#!/usr/bin/env bash
# Set everything up and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/python -m ruff check fakegpt tests tools
.venv/bin/python -m ruff format --check fakegpt tests tools
.venv/bin/python -m mypy  # fakegpt/ only, configured in pyproject.toml ([tool.mypy]); a few seconds
# A PostgreSQL server on loopback for the shared-storage test of `fakegpt tune` (that test is skipped without
# one, or fails when FAKEGPT_REQUIRE_POSTGRES=1, as in CI). A server this script started is stopped at the end.
if [ -z "${FAKEGPT_TEST_POSTGRES_URL:-}" ]; then
  pg_running=0
  if bash tools/postgres.sh status; then pg_running=1; fi
  if FAKEGPT_TEST_POSTGRES_URL=$(bash tools/postgres.sh); then
    export FAKEGPT_TEST_POSTGRES_URL
    if [ "$pg_running" = 0 ]; then trap 'bash tools/postgres.sh stop' EXIT; fi
  else
    echo "tools/test.sh: no PostgreSQL server (tools/postgres.sh failed); its test will be skipped" >&2
  fi
fi
# Two test processes (pytest-xdist): while one test waits on its child processes (torchrun, mlflow run, the
# workers of a series) the other computes. FAKEGPT_TEST_PROCESSES=0 runs them in this one process.
.venv/bin/python -m pytest -q -n "${FAKEGPT_TEST_PROCESSES:-2}" --durations=15 "$@"
