#!/usr/bin/env bash
# Export a megarm reward-model checkpoint (saved at any TP/PP) as a Hugging Face
# Qwen2ForSequenceClassification (num_labels=1) that transformers and vLLM load.
#
#   MCORE_DIR=/ckpt/qwen25_7b_orm_run HF_DIR=/models/qwen25-7b-orm \
#       examples/ckpt/ckpt_convert_qwen25_mcore2hf_orm.sh --iteration 2000
#
# The checkpoint's own TP/PP do not matter (it is resharded on load); TP and PP are
# accepted for symmetry with the hf2mcore wrapper and ignored. The tokenizer is copied
# from TOKENIZER_DIR when set, else from MCORE_DIR when hf2mcore put one there.
# Extra options are passed on to ckpt_convert/mcore2hf.py; PYTHON selects the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
MCORE_DIR=${MCORE_DIR:-./model_weights/qwen25-7b-mcore}
HF_DIR=${HF_DIR:-./model_from_mcore/qwen25-7b-orm-hf}
TP=${TP:-1}
PP=${PP:-1}

args=(--load-dir "${MCORE_DIR}" --save-dir "${HF_DIR}")
if [ -n "${TOKENIZER_DIR:-}" ]; then
    args+=(--tokenizer-model "${TOKENIZER_DIR}")
fi
exec "${PYTHON:-python}" ckpt_convert/mcore2hf.py "${args[@]}" "$@"
