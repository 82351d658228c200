#!/usr/bin/env bash
# Run megarm's test-suite (setting up .venv first if needed) and ruff.
#
#   bash tests/run.sh               # everything (~the CI run)
#   bash tests/run.sh -m "not slow" # the quick subset
#   bash tests/run.sh tests/test_config.py -k unknown
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$MEGARM_PY" -m ruff check .
"$MEGARM_PY" -m pytest "$@"
