#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one command, one table, a few minutes on one data-centre GPU.
#     bash bench/gpu_check.sh              # on a GPU machine
#     bash bench/gpu_check.sh --dry_run    # anywhere: tiny shapes, seconds (the test suite runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" bench/gpu_check.py "$@"  # PYTHON: another interpreter than the first on PATH
