#!/usr/bin/env bash
# Qwen2.5-7B outcome reward model on one node (8 GPUs: TP 4 x DP 2).
#
#   bash examples/rm/orm_trainer_qwen25_7b.sh data.data_path=/data/hh_rlhf \
#       data.tokenizer_name_or_path=/models/Qwen2.5-7B-Instruct checkpoint.load=/ckpt/qwen25_7b_mcore
#
# Any config key can be overridden as section.key=value after the script name.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

GPUS_PER_NODE="${GPUS_PER_NODE:-8}"          # processes on this node
MASTER_PORT="${MASTER_PORT:-6000}"
PYTHON="${PYTHON:-python}"
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP comm/compute overlap
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "$GPUS_PER_NODE" --nnodes 1 --master_port "$MASTER_PORT" \
  -m megarm.train --config configs/orm_trainer_qwen25_7b.yaml "$@"
