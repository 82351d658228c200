#!/usr/bin/env bash
# Convert a Hugging Face Qwen2.5 checkpoint (Qwen2ForCausalLM, or a
# Qwen2ForSequenceClassification reward model with num_labels=1) into a megarm
# reward-model checkpoint.
#
#   HF_DIR=/models/Qwen2.5-7B-Instruct MCORE_DIR=/ckpt/qwen25_7b_orm TP=4 PP=2 \
#       examples/ckpt/ckpt_convert_qwen25_hf2mcore_orm.sh
#   examples/ckpt/ckpt_convert_qwen25_hf2mcore_orm.sh --format legacy --params-dtype fp32
#
# torch_dist output (the default) loads at any TP/PP; TP and PP are then only checked
# (TP must divide the KV heads, PP the layers). With --format legacy they are the
# exact layout written. Extra options are passed on to ckpt_convert/hf2mcore.py;
# PYTHON selects the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
HF_DIR=${HF_DIR:-./model_from_hf/qwen25-7b-hf}
MCORE_DIR=${MCORE_DIR:-./model_weights/qwen25-7b-mcore}
TP=${TP:-1}
PP=${PP:-1}

args=(
    --load-dir "${HF_DIR}"
    --save-dir "${MCORE_DIR}"
    --target-tensor-parallel-size "${TP}"
    --target-pipeline-parallel-size "${PP}"
)
# The tokenizer files are copied from HF_DIR unless TOKENIZER_DIR names another dir.
if [ -n "${TOKENIZER_DIR:-}" ]; then
    args+=(--tokenizer-model "${TOKENIZER_DIR}")
fi
exec "${PYTHON:-python}" ckpt_convert/hf2mcore.py "${args[@]}" "$@"
