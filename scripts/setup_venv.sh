#!/usr/bin/env bash
# Create (or bring up to date) a virtual environment with opd and its pinned dependencies.
#
#   scripts/setup_venv.sh [VENV] [EXTRAS]      (what `make` runs; VENV defaults to .venv, EXTRAS to dev,bench)
#
# - Python >= 3.10 is needed ($PYTHON, default python3).
# - torch: the CUDA build where `nvidia-smi` sees a GPU, else the CPU build (from a local wheel directory
#   that pip is configured with, else from PyTorch's CPU index: a plain `pip install torch` on a CPU-only
#   machine downloads the multi-GB CUDA build). Override with OPD_TORCH=cpu|cuda|skip.
# - everything else from the checked-in lock (requirements-lock.txt, refreshed by `make lock`), so a new
#   upstream release inside a version range cannot change what gets installed.
# A second run with nothing changed does nothing (the stamp file $VENV/.opd-installed).
# Errors are one line on stderr; pip's own output is in $VENV/setup.log.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
EXTRAS="${2:-dev,bench}"
LOCK="${OPD_LOCK:-requirements-lock.txt}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$LOCK")"
CPU_INDEX="${OPD_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"

fail() { echo "error: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || fail "no '$PYTHON' on PATH: install Python 3.10 or newer (or run with PYTHON=/path/to/python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null \
  || fail "opd needs Python >= 3.10; '$PYTHON' is $("$PYTHON" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo unknown) (run with PYTHON=/path/to/python3.11)"
[ -f "$LOCK" ] || fail "lock file $LOCK is missing (restore it with git, or create it with 'make lock')"

STAMP="$VENV/.opd-installed"
WANT="$(cat "$LOCK" pyproject.toml | cksum | cut -d' ' -f1) $EXTRAS"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c 'import opd' 2>/dev/null; then
  exit 0   # up to date
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setting up $VENV (first time: a few minutes; log: $VENV/setup.log)" >&2
  "$PYTHON" -m venv "$VENV" 2>/dev/null \
    || fail "could not create $VENV with '$PYTHON -m venv' (on Debian/Ubuntu: apt-get install python3-venv)"
else
  echo "updating $VENV (pyproject.toml or the lock changed; log: $VENV/setup.log)" >&2
fi
LOG="$VENV/setup.log"
: > "$LOG"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

network_hint() {
  if grep -qiE "Could not find a version|No matching distribution|Failed to establish|Name or service|Temporary failure|Network is unreachable|timed out|ConnectionError|HTTPSConnection" "$LOG"; then
    echo "could not download $1 (no network?): the first set-up needs PyPI (and, for a CPU torch without a local wheel, PyTorch's CPU index); later runs work offline (details: $LOG)"
  else
    echo "installing $1 failed (details: $LOG)"
  fi
}

# torch first: which build depends on the machine, so the lock pins only its version.
if [ "${OPD_TORCH:-auto}" != "skip" ] && ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  kind="${OPD_TORCH:-auto}"
  if [ "$kind" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then kind=cuda; else kind=cpu; fi
  fi
  echo "installing torch $TORCH_VERSION ($kind build)" >&2
  if [ "$kind" = cuda ]; then
    "${PIP[@]}" install -c "$LOCK" "torch==$TORCH_VERSION" >>"$LOG" 2>&1 || fail "$(network_hint "torch $TORCH_VERSION")"
  elif [ "$kind" = cpu ]; then
    # A local wheel directory (pip's find-links) first, without touching any index; then PyTorch's CPU index.
    # --no-deps: only torch comes from there; its dependencies come from PyPI in the next step, at the
    # lock's versions (the CPU index carries its own, older copies of some of them).
    "${PIP[@]}" install --no-deps --no-index "torch==$TORCH_VERSION" >>"$LOG" 2>&1 \
      || "${PIP[@]}" install --no-deps "torch==$TORCH_VERSION" --index-url "$CPU_INDEX" >>"$LOG" 2>&1 \
      || fail "$(network_hint "torch $TORCH_VERSION (CPU build, from $CPU_INDEX)")"
  else
    fail "OPD_TORCH=$kind: use cpu, cuda or skip"
  fi
fi

echo "installing opd[$EXTRAS] with the versions in $LOCK" >&2
"${PIP[@]}" install -c "$LOCK" -e ".[$EXTRAS]" >>"$LOG" 2>&1 || fail "$(network_hint "opd's dependencies")"
echo "$WANT" > "$STAMP"
echo "ready: $VENV ($("$VENV/bin/python" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))" >&2
