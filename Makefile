# megadiff developer targets. `make setup` once, then `make test`.
#
# Two tested stacks (README "Versions"); the interpreter decides which one a venv gets:
#   (a) make test                                        Python 3.11: torch 2.13, megatron-core 0.16.1, transformers 5.x
#   (b) make PYTHON=python3.12 VENV=.venv-py312 test     Python 3.12: torch 2.11, megatron-core 0.19.x, transformers 4.57.6
# MEGADIFF_SYSTEM_PACKAGES=1 make setup: a venv that sees the interpreter's packages
# (--system-site-packages) and keeps its torch, Transformer Engine and apex (NGC-style images).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MEGADIFF_SYSTEM_PACKAGES ?= 0

# pyenv: a shim such as `python3.12` fails ("command not found") unless PYENV_VERSION names an
# installed 3.12.x; then take the newest such version, so the commands above work there as is.
ifeq ($(shell $(PYTHON) -c 'print(1)' 2>/dev/null),)
PYENV_VERSION ?= $(shell pyenv versions --bare 2>/dev/null | grep -E '^$(subst python,,$(notdir $(PYTHON)))\.[0-9]+$$' | sort -V | tail -1)
export PYENV_VERSION
endif

# Pins per stack (megatron-core 0.17+ need Python 3.12; transformers 4.57 is what the official
# LLaDA2 remote code needs).
STACK := $(shell PYENV_VERSION=$(PYENV_VERSION) $(PYTHON) -c 'import sys; print("a" if sys.version_info < (3, 12) else "b")' 2>/dev/null)
ifeq ($(STACK),a)
TORCH_PIN := torch==2.13.0
PINS := megatron-core==0.16.1 "transformers>=5,<6"
else
TORCH_PIN := torch==2.11.0
PINS := "megatron-core>=0.19,<0.20" transformers==4.57.6
endif
ifeq ($(MEGADIFF_SYSTEM_PACKAGES),1)
VENV_FLAGS := --system-site-packages
else
VENV_FLAGS :=
endif

.PHONY: setup test test-fast lint format demo demo-clean clean versions

$(VENV)/.installed: setup.py
	@test -n "$(STACK)" || { echo "error: PYTHON=$(PYTHON) does not run; pass PYTHON=python3.11 or python3.12"; exit 1; }
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(MEGADIFF_SYSTEM_PACKAGES),1)
	@$(PY) -c 'import torch' 2>/dev/null || { echo "error: MEGADIFF_SYSTEM_PACKAGES=1, but $(PYTHON) has no torch to reuse; unset it to install $(TORCH_PIN)"; exit 1; }
	$(PY) -c 'import importlib.metadata as m; print("torch==" + m.version("torch"))' > $(VENV)/torch-constraint.txt
	$(PY) -m pip install -q -c $(VENV)/torch-constraint.txt $(PINS) -e ".[dev]"
else
	$(PY) -m pip install -q $(TORCH_PIN) $(PINS) -e ".[dev]"
endif
	touch $@

setup: $(VENV)/.installed

versions: setup
	@$(PY) -c 'import sys, importlib.metadata as m; print("stack: python " + sys.version.split()[0], *(f"{p} {m.version(p)}" for p in ("torch", "megatron-core", "transformers")), sep=", ")'

# Everything; GPU tests run where CUDA exists and skip cleanly elsewhere. pytest's exit 5
# (no tests collected) is a failure, not a pass. MEGADIFF_TESTS=light: the lighter set that CI
# runs on its second stack (every layout still runs once; see tests/conftest.py).
test: versions
	@$(PY) -m pytest tests -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow and not dist"

# The whole pipeline on a built-in tiny LLaDA2 (CPU, no downloads): see tools/demo.py.
demo: setup
	OMP_NUM_THREADS=1 $(PY) tools/demo.py --output demo_out

demo-clean:
	rm -rf demo_out

LINT_PATHS := megadiff checkpoint_converters tools tests benchmarks

# ruff's rules (ruff.toml) and its formatter; `make format` applies the formatter. lint-imports
# checks the import contracts in .importlinter (megadiff never imports the converters, tools or
# tests; inside megadiff the layers import only downwards).
lint: setup
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	PYTHONPATH=. $(VENV)/bin/lint-imports

format: setup
	$(PY) -m ruff format $(LINT_PATHS)
	$(PY) -m ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) build *.egg-info

# ---- GPU check (README, "GPU check") ------------------------------------------------------------
# Runs with the `make setup` venv's python where there is one, else $(PYTHON) (a GPU node's or the
# lent machine's own python, which must have torch + megatron-core); without torch, CUDA or
# megatron-core it refuses with one line (exit 2). Tests, end to end and benchmark phases in 8 min.
GPU_CHECK_ARGS ?= --output gpu_check_out
GPU_CHECK_PYTHON := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

.PHONY: gpu-check gpu-wheels

gpu-check:
	$(GPU_CHECK_PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

# cp312 manylinux wheels of what a bare torch image lacks (megatron-core; its needs torch, numpy
# and packaging are there), into .whl/ for a machine without network; must stay under 64 MiB.
GPU_WHEELS := megatron-core==0.19.2
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  -d .whl $(GPU_WHEELS)
	@du -sm .whl | awk '{ if ($$1 > 64) { print "error: .whl is " $$1 " MiB, over the 64 MiB a device call carries"; exit 1 } else print ".whl: " $$1 " MiB" }'
	@ls .whl
