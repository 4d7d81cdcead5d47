#!/usr/bin/env bash
# The one script a GPU session runs on one H100/H200: the GPU tests, then the comparisons of
# every benchmark file, then our tile sweeps, each stage under its own limit.
#
#   benchmarks/gpu_check.sh            full check, at most 8 minutes
#   benchmarks/gpu_check.sh --quick    (or QUICK=1) at most 4 minutes: the curated GPU tests
#                                      (benchmarks/gpu_quick_tests.txt) and the three headline
#                                      comparisons, so a 15-minute loan leaves room to rerun
#   benchmarks/gpu_check.sh --dry-run  the whole script on this CPU, before any GPU sees it:
#                                      Triton's interpreter, tiny shapes (UNIGEN_BENCH_TINY), each
#                                      limit scaled by DRY_RUN_SCALE (default 2); the GPU tests
#                                      are collected (a missing node id fails) and skip. CI runs
#                                      it (tests/test_gpu_check.py).
#   --only=gpu_tests,attention,...     only these stages (a rerun inside the same loan); the
#                                      stages: gpu_tests, attention, cross_entropy, contrastive,
#                                      and in the full check train_step, hf_patch, tile_sweeps
#   UNIGEN_GPU_CHECK_TESTS=FILE, UNIGEN_GPU_CHECK_TESTS_LIMIT=S: another curated test list and
#                                      its limit (the tests of this script use them)
#
# How it is run: from this machine through the device tool, which copies the working tree
# there; the wheels travel in the ignored .whl/ folder (benchmarks/fetch_gpu_wheels.sh), which
# the call names in `carry`:
#   run(command="benchmarks/gpu_check.sh --quick", carry=[".whl"], timeout_s=300)
# Without .whl/ it warns and goes on: the comparisons it would have carried skip, each with its
# reason (the machine's own packages, pytest-benchmark among them, are used as they are).
#
# A loan is not wasted on a stage that overruns: each stage is a pytest run stopped at its limit
# with SIGINT (then SIGKILL 15 s later), on which pytest still prints its summary, and every
# stage runs with -rfE --tb=short, so a cut stage keeps the failures it found and, for the
# benchmarks, the rows it measured (benchmarks/conftest.py rewrites the tables after each one).
# The order inside a stage (benchmarks/gpu_check_plugin.py): the curated GPU tests first, in
# their list's order (the headline kernels' correctness first), our rows first, and whatever
# compiles heavily before it runs (FlexAttention, torch.compile) last. The limits: the quick
# GPU-test list is sized by the sm_90 compile check's seconds per kernel x 1.5 (its file says
# how; tests/test_gpu_check.py checks the sum against the limit below).
#
# Results: logs, JSON and markdown tables. Without $OUT they are written to benchmarks/results/.
# With $OUT (the device tool's return folder, which brings back at most 8 files) they are written
# to a scratch folder and, after every stage, gathered into three files: $OUT/summary.md (every
# markdown table), $OUT/results.json (every JSON) and $OUT/gpu_results.tar.gz (all of it, logs
# included), so that a stage killed at its limit still leaves what the earlier ones measured.
# The tile sweeps end with the best configuration per case (printed, and in tile_sweep_best.md).
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK="${QUICK:-0}"
DRY_RUN="${DRY_RUN:-0}"
ONLY=""
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --only=*) ONLY=",${arg#--only=}," ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (takes --quick, --dry-run, --only=STAGE,...)" >&2; exit 2 ;;
  esac
done
wanted() { [ -z "$ONLY" ] || [[ "$ONLY" == *",$1,"* ]]; }
PY="${PYTHON:-python3}"

# Stage limits in seconds (q_: the quick check). Quick: 210 s, plus ~5 s of start-up per stage:
# under 4 minutes. Full: 475 s, plus start-up: about 8 minutes (tests/test_gpu_check.py adds
# them up; the quick GPU-test list is sized to its limit there too).
declare -A LIMIT=(
  [q_gpu_tests]=110 [q_attention]=35 [q_cross_entropy]=35 [q_contrastive]=30
  [gpu_tests]=110 [cross_entropy]=70 [contrastive]=55 [attention]=60 [train_step]=70
  [hf_patch]=45 [tile_sweeps]=65
)
LIMIT_TESTS="${LIMIT[$([ "$QUICK" = 1 ] && echo q_)gpu_tests]}"
LIMIT_TESTS="${UNIGEN_GPU_CHECK_TESTS_LIMIT:-$LIMIT_TESTS}"
QUICK_TESTS="${UNIGEN_GPU_CHECK_TESTS:-benchmarks/gpu_quick_tests.txt}"

if [ "$DRY_RUN" = 1 ]; then
  # this CPU, the interpreter, no GPU even where one is visible, no heavy compiles
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" UNIGEN_GPU_CHECK_SKIP_HEAVY=1 UNIGEN_BENCH_TINY=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # tiny ops: threads only spin
  SCALE="${DRY_RUN_SCALE:-2}"
else
  unset TRITON_INTERPRET  # the real GPU kernels, not the interpreter
  SCALE=1
  # a GPU first: on a machine without one every stage would skip or time the CPU
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to $PY's torch: this script runs on the GPU machine (--dry-run runs it here)" >&2
    exit 2
  fi
fi
scaled() { echo $(( $1 * SCALE )); }

FINAL_OUT="${OUT:-}"
if [ -n "$FINAL_OUT" ]; then
  RESULTS="$(mktemp -d /tmp/unigen-gpu-results.XXXXXX)"
else
  RESULTS="benchmarks/results"
fi
mkdir -p "$RESULTS"
export OUT="$RESULTS"  # where the benchmark files write their tables
export PYTHONUNBUFFERED=1

bundle() {
  [ -n "$FINAL_OUT" ] || return 0
  tar czf "$FINAL_OUT/gpu_results.tar.gz" -C "$RESULTS" .
  cat "$RESULTS"/device.txt "$RESULTS"/stages.txt "$RESULTS"/*.md > "$FINAL_OUT/summary.md" 2>/dev/null
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
# already is left alone (no version of ours shadows it). Without .whl/: a warning, and the run
# goes on with what the machine has.
if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: carried wheels are not installed"
elif ! compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_check.sh: WARNING: no .whl/ wheels (run benchmarks/fetch_gpu_wheels.sh here and name .whl in the device call's carry); going on without the comparisons they carry" >&2
else
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
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/unigen-site $missing \
      || echo "gpu_check.sh: WARNING: some carried wheels did not install; going on" >&2
    export PYTHONPATH="/tmp/unigen-site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  # CUDA 12's runtime library for the carried xformers (built with CUDA 12.8): its own folder
  # on the loader's path, where only that soname lives (CUDA 13 programs never look for it)
  if compgen -G ".whl/nvidia_cuda_runtime_cu12-*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/unigen-cu12 \
      .whl/nvidia_cuda_runtime_cu12-*.whl \
      && export LD_LIBRARY_PATH="/tmp/unigen-cu12/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
fi
BENCH_OK=1
if ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  echo "gpu_check.sh: WARNING: pytest-benchmark is missing (carry it in .whl/): the benchmark stages are skipped, the GPU tests run" >&2
  BENCH_OK=0
fi

# The package from the source tree, without an install (the C++ op is a CPU op; skipping its
# build saves minutes): unigen.kernels finds the checkout's kernels/<op>/ folders itself. The
# stage order plugin is benchmarks/gpu_check_plugin.py, reached through the same path.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UNIGEN_GPU_CHECK_FIRST="$(realpath "$QUICK_TESTS")"
PYTEST_ARGS=(-q -rfE --tb=short -p no:cacheprovider -p benchmarks.gpu_check_plugin)

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "mode: $([ "$QUICK" = 1 ] && echo quick || echo full)$([ "$DRY_RUN" = 1 ] && echo ', dry run on CPU')"
} 2>&1 | tee "$RESULTS/device.txt"
bundle

# One pytest run under a limit: SIGINT at the limit (pytest stops and prints its summary with
# the failures so far; the benchmark tables are already written), SIGKILL 15 s later if it
# hangs. Sets STAGE_RC and adds a line to the stage summary; FAILURES counts the failed and
# erroring tests of every stage (a stage stopped at its limit is incomplete, not failed).
FAILURES=0
SUMMARY=()
run_pytest() {  # name, limit in seconds, pytest arguments...
  local name=$1 limit start status failed; limit=$(scaled "$2"); shift 2
  echo "== $name (limit ${limit} s)"
  start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$PY" -m pytest "$@" "${PYTEST_ARGS[@]}" 2>&1 \
    | tee "$RESULTS/$name.log"
  STAGE_RC=${PIPESTATUS[0]}
  case "$STAGE_RC" in
    0) status="complete" ;;
    1) status="complete, with failures" ;;
    5) status="nothing selected"; STAGE_RC=0 ;;
    124) status="stopped at its limit (SIGINT; what ran is above and kept)" ;;
    137) status="killed 15 s after its limit (it did not stop on SIGINT)" ;;
    *) status="pytest exit status $STAGE_RC" ;;
  esac
  failed=$(grep -cE '^(FAILED|ERROR) ' "$RESULTS/$name.log")
  # a usage or collection error (a curated node id that does not exist: 4), an internal error
  # (3) or an interruption other than the limit's (2) fails the stage as a whole
  case "$STAGE_RC" in 2|3|4) failed=$(( failed + 1 )) ;; esac
  FAILURES=$(( FAILURES + failed ))
  echo "$name: $status, $failed failed"
  SUMMARY+=("$name: limit ${limit} s, ran $(( SECONDS - start )) s, $status, $failed failed")
  bundle
}

# GPU tests: quick mode runs the curated list only (headline kernels' correctness first); the
# full check runs every GPU test, the curated ones first and the heavy compiles last.
if ! wanted gpu_tests; then
  :
elif [ "$QUICK" = 1 ]; then
  mapfile -t quick_ids < <("$PY" -c "from benchmarks.gpu_check_plugin import read_node_ids; print('\n'.join(read_node_ids('$UNIGEN_GPU_CHECK_FIRST')))")
  run_pytest gpu_tests "$LIMIT_TESTS" "${quick_ids[@]}"
else
  run_pytest gpu_tests "$LIMIT_TESTS" tests -m gpu --continue-on-collection-errors
fi

# One pytest per benchmark file, each under its own limit, the comparisons first and our tile
# sweeps last (they matter least if time runs short); each stage writes
# benchmarks_gpu_<stage>.{json,md} (benchmarks_cpu_<stage> in a dry run).
run_stage() {  # name, limit in seconds, pytest arguments...
  local name=$1 limit=$2; shift 2
  wanted "$name" || return 0
  if [ "$BENCH_OK" != 1 ]; then
    echo "== benchmarks: $name skipped (no pytest-benchmark)"
    return
  fi
  # --long: the cases marked long (opt-in on a CPU machine) run here as they always did
  UNIGEN_BENCH_NAME=$name run_pytest "benchmarks_$name" "$limit" "$@" --benchmark-only --long \
    --benchmark-columns=mean,min,rounds
}

# The best configuration per case of the tile sweeps: the fastest row of each (benchmark,
# case), with the tile parameters it recorded.
best_tiles() {
  "$PY" - "$RESULTS"/benchmarks_*_tile_sweeps.json "$RESULTS/tile_sweep_best.md" <<'PYEOF'
import json, pathlib, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
if not src.exists():
    print("tile sweeps: no results"); sys.exit(0)
META = {"group", "name", "provider", "params", "mean_ms", "min_ms", "rounds", "device", "torch",
        "triton", "samples", "heads", "head_dim", "dtype", "peak_mem_mb", "outputs_mb", "tokens"}
cases = {}
for row in json.loads(src.read_text())["results"]:
    key = (row["group"], json.dumps(row["params"], sort_keys=True))
    cases.setdefault(key, []).append(row)
lines = ["", "Best tile configuration per case (tile sweeps):", "",
         "| benchmark | case | best | mean ms | default (ours) ms | config |", "|---|---|---|---:|---:|---|"]
for (group, params), rows in sorted(cases.items()):
    best = min(rows, key=lambda r: r["mean_ms"])
    default = next((r for r in rows if r["provider"] == "ours"), None)
    case = ", ".join(f"{k}={v}" for k, v in json.loads(params).items()) or "-"
    cfg = ", ".join(f"{k}={v}" for k, v in best.items() if k not in META) or "(defaults)"
    lines.append(f"| {group} | {case} | {best['provider']} | {best['mean_ms']:.3f} | "
                 f"{default['mean_ms']:.3f} | {cfg} |" if default else
                 f"| {group} | {case} | {best['provider']} | {best['mean_ms']:.3f} | - | {cfg} |")
text = "\n".join(lines) + "\n"
print(text)
dst.write_text(text)
PYEOF
  bundle
}

if [ "$QUICK" = 1 ]; then
  # the three headline comparisons (-m headline: the benchmarks' headline case)
  run_stage attention "${LIMIT[q_attention]}" benchmarks/test_bench_attention.py \
    -k "test_attention_fwd_bwd and (ours or xformers or (prefix and (flex or sdpa_padded)) or (causal and (flash_attn or torch_varlen)))"
  run_stage cross_entropy "${LIMIT[q_cross_entropy]}" benchmarks/test_bench_cross_entropy.py \
    -m headline -k test_cross_entropy_fwd_bwd
  run_stage contrastive "${LIMIT[q_contrastive]}" benchmarks/test_bench_contrastive.py \
    -m headline -k test_contrastive_fwd_bwd_mining
else
  run_stage cross_entropy "${LIMIT[cross_entropy]}" benchmarks/test_bench_cross_entropy.py -k "not tile_sweep"
  run_stage contrastive "${LIMIT[contrastive]}" benchmarks/test_bench_contrastive.py -k "not tile_sweep"
  run_stage attention "${LIMIT[attention]}" benchmarks/test_bench_attention.py -k "not tile_sweep"
  # one UniGen training step of the paper-size model at the per-GPU batch 64: fused, fused from
  # stored ViT features (the feature store's step, goal >= 2x fused), naive, apex where present
  run_stage train_step "${LIMIT[train_step]}" benchmarks/test_bench_train_step.py
  # a training step of a 1B-class Llama (random weights, 4096 tokens, bf16), unpatched vs
  # patch_hf_model (and Liger / CCE where they can patch it); needs transformers
  run_stage hf_patch "${LIMIT[hf_patch]}" benchmarks/test_bench_hf_patch.py
  # ~45 kernel compiles (0.2-0.8 s each in the compile check) before ~40 short timings
  run_stage tile_sweeps "${LIMIT[tile_sweeps]}" benchmarks/test_bench_attention.py \
    benchmarks/test_bench_contrastive.py benchmarks/test_bench_cross_entropy.py -k tile_sweep
  wanted tile_sweeps && best_tiles
fi

echo
echo "== stages"
printf '%s\n' "${SUMMARY[@]}" | tee "$RESULTS/stages.txt"
bundle
echo "$FAILURES failed or erroring tests and benchmarks; results in ${FINAL_OUT:-$RESULTS}"
exit $(( FAILURES > 0 ))
