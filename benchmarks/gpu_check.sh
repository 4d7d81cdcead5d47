#!/usr/bin/env bash
# The one script a GPU session runs (≤ 8 minutes on one H100/H200): the GPU tests, then the
# comparisons of every benchmark file, then our tile sweeps, each stage under its own limit.
#
# Results: logs, JSON and markdown tables. Without $OUT they are written to benchmarks/results/.
# With $OUT (the device tool's return folder, which brings back at most 8 files) they are written
# to a scratch folder and, after every stage, gathered into three files: $OUT/summary.md (every
# markdown table), $OUT/results.json (every JSON) and $OUT/gpu_results.tar.gz (all of it, logs
# included), so that a stage killed at its limit still leaves what the earlier ones measured.
#
# The GPU machine has torch, triton and pytest-benchmark preinstalled but no network: the
# public alternatives the benchmarks compare against (and pytest-benchmark where absent) travel
# as wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh), installed below where missing.
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL_OUT="${OUT:-}"
if [ -n "$FINAL_OUT" ]; then
  RESULTS="$(mktemp -d /tmp/unigen-gpu-results.XXXXXX)"
else
  RESULTS="benchmarks/results"
fi
mkdir -p "$RESULTS"
export OUT="$RESULTS"  # where the benchmark files write their tables
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real GPU kernels, not the interpreter
PY="${PYTHON:-python3}"

bundle() {
  [ -n "$FINAL_OUT" ] || return 0
  tar czf "$FINAL_OUT/gpu_results.tar.gz" -C "$RESULTS" .
  cat "$RESULTS"/device.txt "$RESULTS"/*.md > "$FINAL_OUT/summary.md" 2>/dev/null
  # every benchmark JSON of the run in one file: {"<file stem>": <its JSON>}
  "$PY" - "$RESULTS" "$FINAL_OUT/results.json" <<'PYEOF'
import json, pathlib, sys
folder, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
target.write_text(json.dumps(merged, indent=1))
PYEOF
  return 0
}

# Wheels carried in .whl/ (benchmarks/fetch_gpu_wheels.sh): install, into a private folder put
# first on the path, each one none of whose top-level modules this machine has; a package it has
# already is left alone (no version of ours shadows it).
if compgen -G ".whl/*.whl" > /dev/null; then
  missing=$("$PY" - .whl/*.whl <<'PYEOF'
import importlib.util, sys, zipfile
for wheel in sys.argv[1:]:
    names = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    modules = {n[:-3] if n.endswith(".py") else n for n in names
               if not n.endswith((".dist-info", ".data")) and (n.endswith(".py") or "." not in n)}
    if modules and all(importlib.util.find_spec(m) is None for m in modules):
        print(wheel)
PYEOF
)
  if [ -n "$missing" ]; then
    echo "installing carried wheels: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/unigen-site $missing
    export PYTHONPATH="/tmp/unigen-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  echo "pytest-benchmark missing: run benchmarks/fetch_gpu_wheels.sh and carry .whl/" >&2
  exit 2
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
bundle

echo "== GPU tests"
timeout 120 "$PY" -m pytest tests -m gpu -q -p no:cacheprovider --continue-on-collection-errors 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
bundle

# One pytest per benchmark file, each under its own limit, the comparisons first and our tile
# sweeps last (they matter least if time runs short); each stage writes
# benchmarks_gpu_<stage>.{json,md} (benchmarks/conftest.py rewrites them after every benchmark,
# so a stage stopped at its limit keeps the rows it measured).
bench_rc=0
run_stage() {  # name, limit in seconds, pytest arguments...
  local name=$1 limit=$2; shift 2
  echo "== benchmarks: $name (limit ${limit} s)"
  UNIGEN_BENCH_NAME=$name timeout "$limit" "$PY" -m pytest "$@" --benchmark-only -q \
    -p no:cacheprovider --benchmark-columns=mean,min,rounds 2>&1 | tee "$RESULTS/benchmarks_$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || [ "$rc" -eq 5 ] || bench_rc=$rc  # 5: nothing selected
  bundle
}
# (the stage limits and the GPU tests' 120 s add up to the script's 8 minutes)
run_stage cross_entropy 90 benchmarks/test_bench_cross_entropy.py -k "not tile_sweep"
run_stage contrastive 70 benchmarks/test_bench_contrastive.py -k "not tile_sweep"
run_stage attention 70 benchmarks/test_bench_attention.py -k "not tile_sweep"
# one UniGen training step of the paper-size model at the per-GPU batch 64, fused vs naive
run_stage train_step 50 benchmarks/test_bench_train_step.py
# a training step of a 1B-class Llama (random weights, 4096 tokens, bf16), unpatched vs
# patch_hf_model (and Liger / CCE when carried); needs transformers, skips without it
run_stage hf_patch 45 benchmarks/test_bench_hf_patch.py
run_stage tile_sweeps 35 benchmarks/test_bench_contrastive.py benchmarks/test_bench_cross_entropy.py \
  benchmarks/test_bench_attention.py -k tile_sweep

rm -f unigen/kernels
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc; results in ${FINAL_OUT:-$RESULTS}"
exit $(( tests_rc != 0 || bench_rc != 0 ))
