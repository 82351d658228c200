#!/usr/bin/env bash
# Preprocess the dataset described by configs/datasets/<name>.yaml.
#
#   examples/data/preprocess_data.sh hh_rlhf
#   examples/data/preprocess_data.sh ultrafeedback_binarized --workers 16 --seq-length 2048
#
# Paths in the YAML are relative to the repository root; edit input and
# tokenizer_name_or_path there (or override them here, e.g. --input /data/hh/*.jsonl.gz).
# Options after <name> override the YAML. PYTHON selects the interpreter.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
available=$(ls configs/datasets/*.yaml | xargs -n1 basename | sed 's/\.yaml$//' | tr '\n' ' ')
usage="usage: $0 <name> [options]; name is one of: ${available}
options after <name> are tools/preprocess_data.py's (and override the YAML): $0 <name> --help"
if [ $# -lt 1 ]; then
    echo "${usage}" >&2
    exit 2
fi
case "$1" in
    -h|--help) echo "${usage}"; exit 0 ;;
esac
name=$1
shift
config="configs/datasets/${name}.yaml"
if [ ! -f "${config}" ]; then
    echo "no ${config}; name is one of: ${available}" >&2
    exit 2
fi
exec "${PYTHON:-python}" tools/preprocess_data.py --config "${config}" "$@"
