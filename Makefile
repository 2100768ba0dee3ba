# The two commands of the README are `make demo` and `make test`; each sets up what it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

# OpenMP threads that spin while waiting make CPU training 30-70x slower as soon as a core is
# shared (a data-loader worker, a second DDP process); measured: 0.24 s/step passive vs 2-15 s.
export OMP_WAIT_POLICY ?= PASSIVE

# No GPU but a CUDA toolkit (these machines, CI): compile the CUDA kernels too, for one
# architecture, to prove they build. On a GPU machine (nvidia-smi lists one) nothing is forced:
# the op's setup.py builds for the visible card, or for TORCH_CUDA_ARCH_LIST when you set it.
ifneq ($(shell command -v nvcc 2>/dev/null),)
ifeq ($(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU'),0)
export FORCE_CUDA ?= 1
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif
endif

.PHONY: setup ops demo test bench gpu-check clean-ops

setup:
	@bash tools/setup_env.sh

# Incremental (ninja): unchanged sources are not rebuilt.
ops: setup
	@cd ops && ../$(PY) setup.py -q build_ext --inplace

demo: ops
	$(PY) tools/demo.py $(DEMO_ARGS)

test: ops
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: ops
	$(PY) tools/benchmark_ms_deform_attn.py

# On a machine with an NVIDIA GPU: the CUDA tests of the op, the op benchmark and the end-to-end
# benchmark against HF on the GPU, each log also in $(GPU_CHECK_DIR).
GPU_CHECK_DIR ?= output/gpu_check
gpu-check: ops
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA GPU here')"
	@mkdir -p $(GPU_CHECK_DIR)
	set -o pipefail; $(PY) -m pytest -q -rs tests/test_ms_deform_attn_op.py tests/test_msdeform_wiring.py 2>&1 | tee $(GPU_CHECK_DIR)/cuda_tests.log
	set -o pipefail; $(PY) tools/benchmark_ms_deform_attn.py --device cuda --json $(GPU_CHECK_DIR)/op.json 2>&1 | tee $(GPU_CHECK_DIR)/op.log
	set -o pipefail; $(PY) tools/benchmark.py --random-weights --device cuda --json $(GPU_CHECK_DIR)/end_to_end.json 2>&1 | tee $(GPU_CHECK_DIR)/end_to_end.log

clean-ops:
	rm -rf ops/build ops/*.so
