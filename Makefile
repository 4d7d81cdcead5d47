# `make demo` and `make test` work on a fresh machine: both bootstrap .venv first.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
TORCH   ?= torch==2.13.0
# Where that torch comes from: empty = pip's configured index. PyPI's Linux torch wheel is a
# CUDA build; for the CPU build elsewhere: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# DALI is optional (its tests skip without it): DALI= leaves it out, nvidia-dali-cuda120==2.4.0
# is the CUDA 12 wheel. Its CPU pipelines run on any machine.
DALI    ?= nvidia-dali-cuda130==2.4.0
# The whole suite runs its Triton kernels on CPU through Triton's interpreter.
TEST_ENV := TRITON_INTERPRET=1 OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1

.PHONY: test-transformers-floor bootstrap demo demo-ablations test test-fast lint bench ext cmake-test clean

bootstrap: $(VENV)/.bootstrapped

$(VENV)/.bootstrapped: setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*.h)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	@# Pin a CPU torch only when none is installed (a GPU machine keeps its own).
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -q -r requirements-dev.txt
	$(if $(DALI),$(PY) -m pip install -q "$(DALI)")
	@# --no-build-isolation: build unigen._C against the torch installed above.
	$(PY) -m pip install -q --no-build-isolation -e .
	@$(PY) -c "from unigen._extension import cpp_ops_available as a, cpp_ops_error as e; print('[unigen] C++ ops:', 'built' if a() else 'not built (' + str(e()) + ')')"
	@touch $@

demo: bootstrap
	$(PY) -m unigen.demo

# The paper's Table 2 rows in miniature: 25 runs, about 33 minutes on 2 cores.
demo-ablations: bootstrap
	$(PY) -m unigen.demo.ablations

test: bootstrap
	$(TEST_ENV) $(VENV)/bin/pytest tests -q --timeout=900

# ruff, then the import contracts of pyproject.toml (the layers of docs/architecture.md, no
# cycles). import-linter reads the package from disk, where kernels/ is not under unigen/: it is
# linked in as unigen/kernels (the name it installs under) for the check and removed after.
lint: bootstrap
	$(VENV)/bin/ruff check unigen kernels tests benchmarks setup.py
	@ln -sfn ../kernels unigen/kernels; $(VENV)/bin/lint-imports --no-cache; \
		status=$$?; rm -f unigen/kernels; exit $$status

test-fast: bootstrap
	$(TEST_ENV) $(VENV)/bin/pytest tests -q -x -m "not slow"

# The model tests on the oldest transformers setup.py declares (unigen/model/hf_versions.py):
# that release and the hub/tokenizers versions it pins go into an overlay put first on
# PYTHONPATH, the venv's own transformers untouched.
TRANSFORMERS_FLOOR := 5.6.0
FLOOR_DIR := build/transformers-$(TRANSFORMERS_FLOOR)
test-transformers-floor: bootstrap
	$(VENV)/bin/pip install --quiet --target $(FLOOR_DIR)/deps "huggingface_hub>=1.5,<2" \
		"tokenizers>=0.22,<=0.23.0" typer-slim
	$(VENV)/bin/pip install --quiet --no-deps --target $(FLOOR_DIR)/tf transformers==$(TRANSFORMERS_FLOOR)
	PYTHONPATH=$(CURDIR)/$(FLOOR_DIR)/tf:$(CURDIR)/$(FLOOR_DIR)/deps $(TEST_ENV) $(VENV)/bin/pytest \
		tests/model -q -m "not slow" -p no:cacheprovider

bench: bootstrap
	OUT=$(CURDIR)/benchmarks/results PYTHONPATH=$(CURDIR) $(VENV)/bin/pytest benchmarks --benchmark-only -q

ext: bootstrap
	$(PY) setup.py build_ext --inplace

# Builds the same op library against libtorch and runs its C++ tests.
cmake-test: bootstrap
	cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DCMAKE_BUILD_TYPE=Release
	cmake --build cmake-build -j 2
	cd cmake-build && ctest --output-on-failure

clean:
	rm -rf build cmake-build *.egg-info unigen/*.so
