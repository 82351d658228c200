#!/usr/bin/env bash
# The main job on built-in defaults, offline on CPU in a few minutes: set up .venv
# if needed, then run the end-to-end demo (python -m megarm.demo): tokenizer and a
# tiny Qwen2 HF checkpoint built offline -> synthetic preference pairs ->
# tools/preprocess_data.py -> ckpt_convert/hf2mcore.py -> training at TP=2 through
# torchrun -> ckpt_convert/mcore2hf.py -> held-out accuracy from transformers.
#
#   bash examples/quickstart.sh [--work-dir DIR] [section.key=value ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$MEGARM_PY" -m megarm.demo "$@"
