#!/usr/bin/env bash
# Qwen2.5-32B outcome reward model on 2 nodes x 8 GPUs (TP 8 x PP 2). Run it on
# every node with the same MASTER_ADDR and that node's NODE_RANK:
#
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 bash examples/rm/orm_trainer_qwen25_32b.sh data.data_path=/data/hh_rlhf ...
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 bash examples/rm/orm_trainer_qwen25_32b.sh data.data_path=/data/hh_rlhf ...
#
# Each node prints "waiting for 2 nodes at ADDR:PORT" and gives up after
# RDZV_TIMEOUT seconds (600) if the other does not come. examples/rm/orm_trainer.sh
# does the work; --help lists its environment variables. Under SLURM:
# examples/rm/slurm_orm_trainer.sbatch.
export CONFIG="${CONFIG:-configs/orm_trainer_qwen25_32b.yaml}"
export NNODES="${NNODES:-2}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
export MEGARM_LAUNCHER_NAME="${MEGARM_LAUNCHER_NAME:-examples/rm/orm_trainer_qwen25_32b.sh}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/orm_trainer.sh" "$@"
