#!/usr/bin/env bash
# The newest versions pyproject.toml's ranges allow, in a fresh .venv-latest:
#
#   scripts/newest.sh lock     (make lock)        write them to requirements-lock.txt, the pins every set-up uses
#   scripts/newest.sh test     (make test-latest) run the default suite against them, and say which versions
#                                                 differ from the lock (exit code: pytest's)
#   scripts/newest.sh oldest   (make test-oldest) the same with transformers at the lowest version pyproject.toml
#                                                 allows (the library opd follows most closely), in .venv-oldest
#
# Extra pytest arguments after `test` are passed on (e.g. `scripts/newest.sh test tests/test_runtime.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:?usage: scripts/newest.sh lock|test|oldest [pytest args]}"; shift
VENV="${OPD_LATEST_VENV:-.venv-latest}"
[ "$mode" = oldest ] && VENV="${OPD_OLDEST_VENV:-.venv-oldest}"
LOCK=requirements-lock.txt
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$LOCK" 2>/dev/null || true)"
TORCH_VERSION="${OPD_TORCH_VERSION:-${TORCH_VERSION:-2.13.0}}"   # torch is pinned on purpose: its build is per machine

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
LOG="$VENV/setup.log"
echo "installing the newest allowed versions into $VENV (log: $LOG)" >&2
# A lock made from a temporary file: only torch pinned, everything else as new as the ranges allow.
tmp_lock="$(mktemp)"; echo "torch==$TORCH_VERSION" > "$tmp_lock"
if [ "$mode" = oldest ]; then
  low="$(sed -n 's/^ *"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml | head -1)"
  [ -n "$low" ] || { echo "error: no transformers>=X lower bound found in pyproject.toml" >&2; exit 2; }
  echo "transformers==$low" >> "$tmp_lock"
  echo "transformers pinned to $low, the lowest pyproject.toml allows" >&2
fi
OPD_LOCK="$tmp_lock" scripts/setup_venv.sh "$VENV" dev,bench >/dev/null 2>>"$LOG.err" || { cat "$LOG.err" >&2; exit 1; }
rm -f "$tmp_lock"
PY="$VENV/bin/python"

freeze() {
  "$PY" -m pip --disable-pip-version-check freeze --exclude-editable | sed -E 's/^(torch==[^+]*)\+.*/\1/' | LC_ALL=C sort -f
}

if [ "$mode" = lock ]; then
  {
    echo "# opd's pinned dependencies: every set-up (make test / make demo / scripts/setup_venv.sh, CI) installs these."
    echo "# Made by 'make lock' on $(date -u +%F) with Python $("$PY" -c 'import platform; print(platform.python_version())'):"
    echo "# the newest versions pyproject.toml's ranges allowed that day. torch's build (CPU/CUDA) is chosen per machine."
    freeze
  } > "$LOCK"
  echo "wrote $LOCK ($(grep -vc '^#' "$LOCK") packages); run 'make test' before committing it" >&2
  exit 0
fi

case "$mode" in test|oldest) ;; *) echo "error: unknown mode '$mode' (lock, test or oldest)" >&2; exit 2 ;; esac
echo "newest versions that differ from $LOCK:"
changed="$(diff <(grep -v '^#' "$LOCK" | LC_ALL=C sort -f) <(freeze) | sed -n 's/^> /  /p' || true)"
echo "${changed:-  none}"
set +e
"$PY" -m pytest -q -p no:cacheprovider "$@" > "$VENV/pytest.log" 2>&1
rc=$?
set -e
tail -n 30 "$VENV/pytest.log" | grep -E "^(FAILED|ERROR) " || true
counts="$(tail -n 1 "$VENV/pytest.log" | grep -oE '[0-9]+ (passed|failed|errors?|skipped)' | tr '\n' ' ')"
# Not pytest's own closing line on purpose: CI reads the pinned suite's, this result is for information.
echo "$([ "$mode" = oldest ] && echo oldest-transformers || echo newest-versions) suite: exit $rc; ${counts:-no summary} (log: $VENV/pytest.log)"
exit $rc
