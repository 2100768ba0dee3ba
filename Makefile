# The two commands of the README are `make demo` and `make test`; each sets up what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

# OpenMP threads that spin while waiting make CPU training many times slower as soon as a core
# is shared (a data-loader worker, a second DDP process): they wait passively instead.
export OMP_WAIT_POLICY ?= PASSIVE

# No GPU but a CUDA toolkit: compile the CUDA kernels too, for one architecture, to prove they
# build. On a GPU machine (nvidia-smi lists one) nothing is forced:
# the op's setup.py builds for the visible card, or for TORCH_CUDA_ARCH_LIST when you set it.
ifneq ($(shell command -v nvcc 2>/dev/null),)
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'),0)
export FORCE_CUDA ?= 1
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif
endif

.PHONY: setup ops demo test test-fast bench gpu-bundle gpu-check clean-ops

setup:
	@bash tools/setup_env.sh

# Incremental (ninja): unchanged sources are not rebuilt.
ops: setup
	@cd ops && ../$(PY) setup.py -q build_ext --inplace

demo: ops
	$(PY) tools/demo.py $(DEMO_ARGS)

test: ops
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# The edit loop: everything but the tests marked slow (over ~5 s each: real training runs).
test-fast: ops
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

bench: ops
	$(PY) benchmarks/benchmark_ms_deform_attn.py

# The packages a GPU machine without network access (Python 3.12, torch) lacks, as wheels in
# .whl/ (git-ignored; checked with pip --dry-run; prints the bundle's and the tree's size).
# GPU_BUNDLE_ARGS=--no-rasterio leaves out rasterio, the largest wheel, which only predict.py on
# GeoTIFFs needs.
gpu-bundle: setup
	$(PY) tools/gpu_bundle.py $(GPU_BUNDLE_ARGS)

# On a machine with an NVIDIA GPU: tools/gpu_check.sh (the op's CUDA tests, compute-sanitizer,
# the op benchmark; the AMP training smoke run, prediction and the end-to-end benchmark against
# HF); logs and summary.json in $(GPU_CHECK_DIR). GPU_CHECK_STAGES: op, train or all.
GPU_CHECK_DIR ?= output/gpu_check
GPU_CHECK_STAGES ?= all
gpu-check: ops
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA GPU here (bash tools/gpu_check.sh --dry-run runs the CPU parts)')"
	OUT=$(GPU_CHECK_DIR) PY=$(PY) bash tools/gpu_check.sh $(GPU_CHECK_STAGES)

clean-ops:
	rm -rf ops/build ops/*.so
