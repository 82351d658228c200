#!/usr/bin/env bash
# Qwen2.5-32B outcome reward model on 2 nodes x 8 GPUs (TP 8 x PP 2). Run this
# script on every node with the same MASTER_ADDR and that node's NODE_RANK:
#
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 bash examples/rm/orm_trainer_qwen25_32b.sh data.data_path=/data/hh_rlhf ...
#   MASTER_ADDR=10.0.0.1 NODE_RANK=1 bash examples/rm/orm_trainer_qwen25_32b.sh data.data_path=/data/hh_rlhf ...
#
# Any config key can be overridden as section.key=value after the script name.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"   # address of node 0, reachable from every node
MASTER_PORT="${MASTER_PORT:-6000}"        # a free TCP port on node 0
NNODES="${NNODES:-2}"                     # number of nodes in the job
NODE_RANK="${NODE_RANK:-0}"               # this node's index, 0..NNODES-1
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"       # processes per node (one per GPU)
PYTHON="${PYTHON:-python}"
# The network interface for gloo / NCCL bootstrap traffic (e.g. eth0, ib0); leave
# unset to let them choose.
if [ -n "${SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}"
fi
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP comm/compute overlap
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

echo "[megarm] node $NODE_RANK/$NNODES, $GPUS_PER_NODE processes, master $MASTER_ADDR:$MASTER_PORT"
exec "$PYTHON" -m torch.distributed.run \
  --nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m megarm.train --config configs/orm_trainer_qwen25_32b.yaml "$@"
