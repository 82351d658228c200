#!/usr/bin/env bash
# The main job on built-in defaults: set up .venv if needed, then train a tiny
# Qwen2-shaped reward model at tensor-parallel size 2 on CPU (or GPU) through
# torchrun, on generated preference pairs, and print the loss and accuracy.
#
#   bash examples/quickstart.sh [section.key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh

NPROC="${NPROC:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "[quickstart] torchrun --nproc_per_node $NPROC -m megarm.train --config configs/orm_trainer_tiny.yaml $*"
start=$(date +%s)
"$MEGARM_PY" -m torch.distributed.run --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29517}" \
  -m megarm.train --config configs/orm_trainer_tiny.yaml "$@"
echo "[quickstart] done in $(( $(date +%s) - start ))s; metrics in runs/tiny/metrics.jsonl, TensorBoard in runs/tiny/tensorboard"
