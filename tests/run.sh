#!/usr/bin/env bash
# Run megarm's test-suite (setting up .venv first if needed) and ruff.
#
#   bash tests/run.sh               # everything (the CI run): ~65 min on a 2-core machine
#   bash tests/run.sh -m "not slow" # the quick subset (multi-process and end-to-end tests left out)
#   bash tests/run.sh tests/test_config.py -k unknown
#
# Each test's name is printed as it starts (-v), so a long multi-process test is
# never silent, and the slowest ones are listed at the end (--durations); -q after
# these restores pytest's dots.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

"$MEGARM_PY" -m ruff check .
"$MEGARM_PY" -m pytest -v --durations=15 "$@"
