#!/usr/bin/env bash
# The test command: prepares .venv on a fresh machine (skipped when already up to date), runs pytest.
#   bash scripts/test.sh            # whole suite
#   bash scripts/test.sh -k config  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# Tiny tensors: one thread is as fast, and immune to spinning against other processes.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m pytest -q "$@"
