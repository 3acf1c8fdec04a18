#!/usr/bin/env bash
# Sourced by the reference/benchmark scripts: makes sure a Python venv with
# torch, diffusers and transformers exists (outside the repository, about
# 5 GB) and exports $PY. ensueno itself never needs Python.
#   ENSUENO_VENV   where the venv lives (default: ~/.cache/ensueno/venv)
set -euo pipefail
ENSUENO_VENV="${ENSUENO_VENV:-$HOME/.cache/ensueno/venv}"
if [ ! -x "$ENSUENO_VENV/bin/python" ] || ! "$ENSUENO_VENV/bin/python" -c "import torch, diffusers, transformers, safetensors" 2>/dev/null; then
    echo "setting up the reference Python environment in $ENSUENO_VENV (torch, diffusers, transformers)..." >&2
    python3 -m venv "$ENSUENO_VENV"
    "$ENSUENO_VENV/bin/pip" install -q -r "$(dirname "${BASH_SOURCE[0]}")/requirements.txt"
fi
PY="$ENSUENO_VENV/bin/python"
export PY
