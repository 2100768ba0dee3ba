# The two commands of the README are `make demo` and `make test`; each sets up what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

# OpenMP threads that spin while waiting make CPU training 30-70x slower as soon as a core is
# shared (a data-loader worker, a second DDP process); measured: 0.24 s/step passive vs 2-15 s.
export OMP_WAIT_POLICY ?= PASSIVE

# No GPU but a CUDA toolkit (these machines, CI): compile the CUDA kernels too, for one
# architecture, to prove they build. On a GPU machine the op's setup.py detects the card.
ifneq ($(shell command -v nvcc 2>/dev/null),)
export FORCE_CUDA ?= 1
export TORCH_CUDA_ARCH_LIST ?= 9.0
endif

.PHONY: setup ops demo test bench clean-ops

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

clean-ops:
	rm -rf ops/build ops/*.so
