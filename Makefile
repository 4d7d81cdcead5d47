# `make demo` and `make test` work on a fresh machine: both bootstrap .venv first, with exactly
# the versions of requirements/dev.lock (`make lock` writes it; docs/install.md).
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
LOCK    ?= requirements/dev.lock
# The lock's torch is the CPU build, torch==2.13.0+cpu. The development machines carry its wheel;
# elsewhere name PyTorch's CPU index: make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
export TORCH_INDEX ?=
# The whole suite runs its Triton kernels on CPU through Triton's interpreter.
TEST_ENV := TRITON_INTERPRET=1 OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1

.PHONY: bootstrap demo demo-ablations test test-fast lint bench ext cmake-test clean lock \
	test-gpu-image test-floor test-latest test-transformers-floor compare-deps

bootstrap: $(VENV)/.bootstrapped

# --keep-torch: a venv given a CUDA torch by hand (a GPU machine) keeps it.
$(VENV)/.bootstrapped: setup.py pyproject.toml $(LOCK) tools/venv_from_requirements.sh $(wildcard csrc/*.cpp csrc/*.h)
	tools/venv_from_requirements.sh --keep-torch $(VENV) $(LOCK) $(PYTHON)
	@touch $@

demo: bootstrap
	$(PY) -m unigen.demo

# The paper's Table 2 rows in miniature: 25 runs, about 33 minutes on 2 cores.
demo-ablations: bootstrap
	$(PY) -m unigen.demo.ablations

test: bootstrap
	$(TEST_ENV) $(VENV)/bin/pytest tests -q --timeout=900

# ruff, then the import contracts of pyproject.toml (the layers of docs/architecture.md, no
# cycles). import-linter reads the package from disk, where the op folders are not under
# unigen/kernels/: each kernels/<folder> is linked in as unigen/kernels/<folder> (the name it
# installs under) for the check and removed after.
lint: bootstrap
	$(VENV)/bin/ruff check unigen kernels tests benchmarks tools setup.py
	@links=""; for dir in kernels/*/; do name=$$(basename $$dir); \
		ln -sfn ../../kernels/$$name unigen/kernels/$$name; links="$$links unigen/kernels/$$name"; done; \
		$(VENV)/bin/lint-imports --no-cache; status=$$?; rm -f $$links; exit $$status

test-fast: bootstrap
	$(TEST_ENV) $(VENV)/bin/pytest tests -q -x -m "not slow"

# The locks: requirements/*.in hold the ranges, `make lock` compiles each into its .lock with
# pip-tools (pinned here), under the Python the lock is for. Rerun it after changing a .in file,
# or with UPGRADE=1 to move every locked version to the newest the ranges allow; commit the
# .lock files.
PIP_TOOLS := pip-tools==7.7.0
LOCK_FLAGS := --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host -q
lock:
	@for spec in dev:3.11 compare:3.11 gpu-image:3.12 floor:3.10; do \
		name=$${spec%%:*}; version=$${spec#*:}; python=$$(tools/find_python.sh $$version) || exit 2; \
		tools=build/lock-tools-$$version; \
		test -x $$tools/bin/pip-compile || { $$python -m venv $$tools && $$tools/bin/pip install -q "$(PIP_TOOLS)"; }; \
		echo "[unigen] requirements/$$name.lock (Python $$version)"; \
		(cd requirements && CUSTOM_COMPILE_COMMAND="make lock" ../$$tools/bin/pip-compile $(LOCK_FLAGS) \
			$(if $(UPGRADE),--upgrade) -o $$name.lock $$name.in) || exit 1; \
	done

# The other environments the project supports, each a venv of its own made from its lock (its
# Python differs from .venv's, so each builds its own unigen._C beside the others): the GPU
# machine's versions and the oldest ones the package metadata admits, on the tests that touch
# what differs between versions (the kernels under Triton's interpreter, the model, FSDP2).
ENV_TESTS := tests/kernels tests/model tests/test_environment.py \
	tests/pretraining/test_distributed.py::test_two_process_fsdp_resume_matches_ddp \
	tests/pretraining/test_distributed.py::test_two_process_fsdp_sharded_checkpoint_resume_matches_ddp
test-gpu-image:
	tools/venv_from_requirements.sh .venv-gpu-image requirements/gpu-image.lock 3.12 3.13 3.11
	$(TEST_ENV) .venv-gpu-image/bin/pytest $(ENV_TESTS) -q --timeout=900 -p no:cacheprovider

test-floor:
	tools/venv_from_requirements.sh .venv-floor requirements/floor.lock 3.10 3.11
	$(TEST_ENV) .venv-floor/bin/pytest $(ENV_TESTS) -q --timeout=900 -p no:cacheprovider

# the name this target had when the floor was only transformers'
test-transformers-floor: test-floor

# The newest releases the ranges allow (requirements/latest.in), on the newest Python here; the
# whole suite. Not locked: it says what the next `make lock` would meet.
test-latest:
	tools/venv_from_requirements.sh .venv-latest requirements/latest.in 3.14 3.13 3.12
	$(TEST_ENV) .venv-latest/bin/pytest tests -q --timeout=900 -p no:cacheprovider

# The public alternatives the benchmarks compare against (requirements/compare.lock), installed
# into .venv under its locked torch, which they never replace; what cannot install here is
# said with the reason.
compare-deps: bootstrap
	$(PY) tools/install_comparisons.py

# --long: the long CPU cases too (the GPT-2 head, minutes per provider): the README's table
bench: bootstrap
	OUT=$(CURDIR)/benchmarks/results PYTHONPATH=$(CURDIR) $(VENV)/bin/pytest benchmarks --benchmark-only --long -q

ext: bootstrap
	$(PY) setup.py build_ext --inplace

# Builds the same op library against libtorch and runs its C++ tests.
cmake-test: bootstrap
	cmake -S . -B cmake-build -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DCMAKE_BUILD_TYPE=Release
	cmake --build cmake-build -j 2
	cd cmake-build && ctest --output-on-failure

clean:
	rm -rf build cmake-build *.egg-info unigen/*.so .venv-gpu-image .venv-floor .venv-latest
