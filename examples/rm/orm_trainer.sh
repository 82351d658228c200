#!/usr/bin/env bash
# Train an outcome reward model with torchrun, on one node or many. Run it on every
# node of the job; see usage() below or `bash examples/rm/orm_trainer.sh --help`.
# The model-size scripts beside it (orm_trainer_qwen25_*.sh) only set CONFIG,
# NNODES and GPUS_PER_NODE defaults and run this one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NAME="${MEGARM_LAUNCHER_NAME:-examples/rm/orm_trainer.sh}"

usage() {
  cat <<EOF
usage: [VAR=value ...] bash $NAME [--config X.yaml | X.yaml] [section.key=value ...]

Starts GPUS_PER_NODE megarm.train processes on this node through torchrun. For a
multi-node job run this same command on EVERY node, with the same MASTER_ADDR,
MASTER_PORT and NNODES and that node's own NODE_RANK (0 on the node at MASTER_ADDR);
examples/rm/slurm_orm_trainer.sbatch does this under SLURM. Before any process
starts, the config is checked once for NNODES x GPUS_PER_NODE ranks (problems are
printed once, with the GPUs each shipped config expects when the count does not fit).

Environment (default):
  CONFIG         config file (${CONFIG:-none}); --config X.yaml or a leading X.yaml
                 argument wins. Shipped: configs/orm_trainer_*.yaml, each stating its GPUs
  NNODES         nodes in the job (${NNODES:-1})
  NODE_RANK      this node's index, 0..NNODES-1 (${NODE_RANK:-0})
  GPUS_PER_NODE  processes on this node, one per GPU (${GPUS_PER_NODE:-8})
  MASTER_ADDR    address of node 0, reachable from every node (${MASTER_ADDR:-127.0.0.1})
  MASTER_PORT    a free TCP port on node 0 (${MASTER_PORT:-6000})
  RDZV_TIMEOUT   seconds to wait for all NNODES nodes before giving up (${RDZV_TIMEOUT:-600})
  SOCKET_IFNAME  network interface for gloo/NCCL traffic, e.g. eth0 or ib0 (unset: they choose)
  PYTHON         interpreter (default: the project's .venv when it exists, else python3);
                 it needs torch and megarm: bash tools/setup_env.sh creates .venv
  DRY_RUN=1      check the config and print the torchrun command instead of running it

Paths in the config and overrides are relative to the repository root ($ROOT).
Any config key can be overridden as section.key=value (docs/config.md lists them).

Examples:
  CONFIG=configs/orm_trainer_qwen25_7b.yaml bash examples/rm/orm_trainer.sh data.data_path=/data/hh_rlhf \\
      checkpoint.load=/ckpt/qwen25_7b_mcore data.tokenizer_name_or_path=/models/Qwen2.5-7B-Instruct
  MASTER_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 bash examples/rm/orm_trainer.sh configs/orm_trainer_qwen25_32b.yaml ...
EOF
}

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -x "${MEGARM_VENV:-$ROOT/.venv}/bin/python" ]; then
    echo "${MEGARM_VENV:-$ROOT/.venv}/bin/python"
  elif command -v python3 >/dev/null 2>&1; then
    echo python3
  else
    echo python
  fi
}

cd "$ROOT"
PYTHON="$(find_python)"
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "[megarm] error: no python found ('$PYTHON'); run bash tools/setup_env.sh or set PYTHON" >&2
  exit 2
fi

for arg in "$@"; do
  if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then
    usage
    echo
    echo "megarm.train's options (after the launcher's):"
    "$PYTHON" -m megarm.train --help 2>/dev/null \
      || echo "  ($PYTHON cannot import megarm: bash tools/setup_env.sh creates .venv)"
    exit 0
  fi
done
if [ $# -eq 0 ]; then
  usage >&2
  exit 2
fi

# The network interface for gloo / NCCL bootstrap traffic (e.g. eth0, ib0).
if [ -n "${SOCKET_IFNAME:-}" ]; then
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-$SOCKET_IFNAME}"
  export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-$SOCKET_IFNAME}"
fi
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # TP comm/compute overlap
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

launch=(
  "$PYTHON" tools/launch.py
  --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}"
  --nproc-per-node "${GPUS_PER_NODE:-8}"
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-6000}"
  --rdzv-timeout "${RDZV_TIMEOUT:-600}"
)
if [ -n "${CONFIG:-}" ]; then
  launch+=(--default-config "$CONFIG")
fi
if [ "${DRY_RUN:-0}" = "1" ]; then
  launch+=(--dry-run)
fi
exec "${launch[@]}" -- "$@"
