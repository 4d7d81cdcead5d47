#!/usr/bin/env bash
# The one script a GPU session runs (≤ 8 minutes on one H100/H200): the GPU tests, then every
# benchmark. Results (logs, JSON, markdown tables) go to $OUT if set, else benchmarks/results/.
#
# The GPU machine has torch and triton preinstalled but no network: pytest-benchmark and its
# dependencies travel as wheels in .whl/ (see benchmarks/fetch_gpu_wheels.sh), installed here
# into a private folder when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS="${OUT:-benchmarks/results}"
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real GPU kernels, not the interpreter
PY="${PYTHON:-python3}"

if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/unigen-site .whl/*.whl
    export PYTHONPATH="/tmp/unigen-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "pytest-benchmark missing and no .whl/ folder: run benchmarks/fetch_gpu_wheels.sh first" >&2
    exit 2
  fi
fi
# The package from the source tree, without an install (the C++ op is a CPU op; skipping its
# build saves minutes): `kernels/` is exposed as `unigen.kernels` through a link.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -e unigen/kernels ] || ln -s ../kernels unigen/kernels

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$RESULTS/device.txt"

echo "== GPU tests"
timeout 150 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# One pytest per benchmark file, each under its own limit, so that one slow file cannot lose
# the others' tables: each writes benchmarks_gpu_<name>.{json,md} (benchmarks/conftest.py).
bench_rc=0
for spec in cross_entropy:110 contrastive:90 attention:110; do
  name=${spec%%:*}; limit=${spec##*:}
  echo "== benchmarks: $name (limit ${limit} s)"
  UNIGEN_BENCH_NAME=$name timeout "$limit" "$PY" -m pytest "benchmarks/test_bench_$name.py" \
    --benchmark-only -q -p no:cacheprovider --benchmark-columns=mean,min,rounds 2>&1 \
    | tee "$RESULTS/benchmarks_$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || bench_rc=$rc
done

rm -f unigen/kernels
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc; results in $RESULTS"
exit $(( tests_rc != 0 || bench_rc != 0 ))
