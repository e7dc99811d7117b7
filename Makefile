# megadiff developer targets. `make setup` once, then `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# megatron-core 0.16.1 is the newest release for Python 3.11 (0.17+ need 3.12).
MCORE_PIN := $(shell $(PYTHON) -c 'import sys; print("megatron-core==0.16.1" if sys.version_info < (3, 12) else "megatron-core")')

.PHONY: setup test test-fast lint demo demo-clean clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "$(MCORE_PIN)" -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# Everything; GPU tests run where CUDA exists and skip cleanly elsewhere. pytest's exit 5
# (no tests collected) is a failure, not a pass.
test: setup
	@$(PY) -m pytest tests -q --durations=15; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

test-fast: setup
	$(PY) -m pytest tests -q -m "not slow and not dist"

# The whole pipeline on a built-in tiny LLaDA2 (CPU, no downloads): see tools/demo.py.
demo: setup
	OMP_NUM_THREADS=1 $(PY) tools/demo.py --output demo_out

demo-clean:
	rm -rf demo_out

lint: setup
	$(PY) -m ruff check megadiff checkpoint_converters tools tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info

# ---- GPU check (README, "GPU check") ------------------------------------------------------------
# Runs with the python that has torch + megatron-core (the system one on a GPU node or the lent
# machine; not the `make setup` venv): `make gpu-check PYTHON=.venv/bin/python` to use that.
GPU_CHECK_ARGS ?= --output gpu_check_out

.PHONY: gpu-check gpu-wheels

gpu-check:
	$(PYTHON) tools/gpu_check.py $(GPU_CHECK_ARGS)

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
