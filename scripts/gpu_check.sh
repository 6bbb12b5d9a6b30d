#!/usr/bin/env bash
# Thin wrapper: scripts/gpu_check.sh [--cpu] OUT_DIR [options] == scripts/gpu_check.py, same arguments.
# The interpreter is the one whose torch/transformers the check exercises: $PYTHON if set, else the active
# virtualenv's, else the checkout's .venv (a developer machine), else python3 (the GPU machine's system one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ] && [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py="$VIRTUAL_ENV/bin/python"
fi
if [ -z "$py" ] && [ -x "$here/../.venv/bin/python" ]; then py="$here/../.venv/bin/python"; fi
exec "${py:-python3}" "$here/gpu_check.py" "$@"
