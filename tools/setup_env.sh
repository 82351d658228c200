#!/usr/bin/env bash
# Create (or reuse) the project-local virtualenv .venv and install megarm into it.
#
#   source tools/setup_env.sh        # sets $MEGARM_PY to the venv's python
#
# Without CUDA it installs torch==2.13.0 (the CPU build) *before* the project,
# because an unpinned torch would pull a multi-GB CUDA build. With CUDA it builds
# the venv on top of the system site-packages so the user's own torch is kept.
# A stamp file records what was installed; a second run skips finished steps.
#
# Sourced, it installs in a child bash and only exports into the caller's shell:
# the caller's options (set -e, -u, pipefail) and variables are left as they were,
# and a failed install returns non-zero instead of closing the caller's shell.

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
  if "${BASH:-bash}" "${BASH_SOURCE[0]}"; then
    MEGARM_PY="${MEGARM_VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}/bin/python"
    export MEGARM_PY
    export PATH="$(dirname "$MEGARM_PY"):$PATH"
    return 0
  fi
  printf '[setup] failed; the environment is unchanged\n' >&2
  return 1
fi

set -euo pipefail
MEGARM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MEGARM_VENV:-$MEGARM_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="2.13.0"
STAMP="$VENV/.megarm-installed"

log() { printf '[setup] %s\n' "$*" >&2; }

has_cuda() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1
}

# What the stamp must match: the dependency list and the kind of machine.
want="$(sha256sum "$MEGARM_ROOT/pyproject.toml" | cut -d' ' -f1)-$(has_cuda && echo cuda || echo cpu)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  log "environment up to date: $VENV"
else
  start=$(date +%s)
  if [ ! -x "$VENV/bin/python" ]; then
    if has_cuda && "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      log "CUDA machine with torch installed: venv on top of the system site-packages"
      "$PYTHON" -m venv --system-site-packages "$VENV"
    else
      log "creating $VENV"
      "$PYTHON" -m venv "$VENV"
    fi
  fi
  pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if has_cuda; then
      log "installing torch (CUDA build) — this is large"
      "${pip[@]}" torch
    else
      log "installing torch==$TORCH_CPU_VERSION (CPU build)"
      "${pip[@]}" "torch==$TORCH_CPU_VERSION"
    fi
  fi
  log "installing megarm and its dependencies (editable, with dev extras)"
  "${pip[@]}" -e "$MEGARM_ROOT[dev]"
  echo "$want" > "$STAMP"
  log "done in $(( $(date +%s) - start ))s"
fi

