#!/usr/bin/env bash
# Qwen2.5-7B outcome reward model on one node of 8 GPUs (TP 4 x DP 2):
#
#   bash examples/rm/orm_trainer_qwen25_7b.sh data.data_path=/data/hh_rlhf \
#       checkpoint.load=/ckpt/qwen25_7b_mcore data.tokenizer_name_or_path=/models/Qwen2.5-7B-Instruct
#
# examples/rm/orm_trainer.sh does the work; --help lists its environment variables
# (CONFIG picks another config, GPUS_PER_NODE another process count, ...).
export CONFIG="${CONFIG:-configs/orm_trainer_qwen25_7b.yaml}"
export NNODES="${NNODES:-1}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export MEGARM_LAUNCHER_NAME="${MEGARM_LAUNCHER_NAME:-examples/rm/orm_trainer_qwen25_7b.sh}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/orm_trainer.sh" "$@"
