#!/usr/bin/env bash
# The one script a GPU session runs on one H100/H200: the GPU tests, then the comparisons of
# every benchmark file, then our tile sweeps, each stage under its own limit.
#
#   benchmarks/gpu_check.sh            full check, at most 8 minutes
#   benchmarks/gpu_check.sh --quick    (or QUICK=1) at most 4 minutes: the GPU tests and the
#                                      three headline comparisons (attention, cross-entropy,
#                                      contrastive), so a 15-minute loan leaves room to rerun
#
# How it is run: from this machine through the device tool, which copies the working tree
# there; the wheels travel in the ignored .whl/ folder (benchmarks/fetch_gpu_wheels.sh), which
# the call must name in `carry`:
#   run(command="benchmarks/gpu_check.sh --quick", carry=[".whl"], timeout_s=300)
# Without .whl/ the script stops at once with one line saying so (UNIGEN_NO_WHEELS=1 runs
# without the carried alternatives, e.g. on a workstation that has them installed).
#
# In every stage our rows run first (a pytest plugin written below moves the "ours" providers
# ahead, the rest keep their order), so a stage cut at its limit still has our headline rows.
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
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (takes --quick)" >&2; exit 2 ;;
  esac
done

# Fail fast, before any minute of the loan goes to imports: the carried wheels first...
if [ ! -d .whl ] && [ "${UNIGEN_NO_WHEELS:-0}" != 1 ]; then
  echo "gpu_check.sh: .whl/ is missing: run benchmarks/fetch_gpu_wheels.sh here and name .whl in the device call's carry (or set UNIGEN_NO_WHEELS=1)" >&2
  exit 2
fi
PY="${PYTHON:-python3}"
# ...then a GPU (on a machine without one every stage would skip or time the CPU)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: no CUDA device visible to $PY's torch: this script runs on the GPU machine" >&2
  exit 2
fi

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
  echo "gpu_check.sh: pytest-benchmark missing: run benchmarks/fetch_gpu_wheels.sh and carry .whl/" >&2
  exit 2
fi

# "ours first": a pytest plugin that moves the benchmarks whose provider is ours ahead of the
# others (the default "ours" row first, then the other "ours_*" rows) and, among the GPU tests,
# those of our kernels (tests/kernels) ahead of the rest; a stable sort otherwise.
PLUGINS="$(mktemp -d /tmp/unigen-gpu-plugins.XXXXXX)"
cat > "$PLUGINS/unigen_ours_first.py" <<'PYEOF'
def _rank(item):
    spec = getattr(item, "callspec", None)
    provider = str(spec.params.get("provider", "")) if spec else ""
    ours = 0 if provider == "ours" else 1 if provider.startswith("ours") else 2
    return ours, 0 if item.nodeid.startswith("tests/kernels/") else 1


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=_rank)  # list.sort is stable: file and parameter order kept within a rank
PYEOF
# The package from the source tree, without an install (the C++ op is a CPU op; skipping its
# build saves minutes): unigen.kernels finds the checkout's kernels/<op>/ folders itself.
export PYTHONPATH="$PWD:$PLUGINS${PYTHONPATH:+:$PYTHONPATH}"

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "mode: $([ "$QUICK" = 1 ] && echo quick || echo full)"
} 2>&1 | tee "$RESULTS/device.txt"
bundle

# GPU tests, our kernels' first
echo "== GPU tests"
tests_limit=$([ "$QUICK" = 1 ] && echo 100 || echo 120)
timeout "$tests_limit" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider -p unigen_ours_first \
  --continue-on-collection-errors 2>&1 | tee "$RESULTS/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 124 ] && echo "GPU tests: stopped at their ${tests_limit} s limit"
bundle

# One pytest per benchmark file, each under its own limit, the comparisons first and our tile
# sweeps last (they matter least if time runs short); each stage writes
# benchmarks_gpu_<stage>.{json,md} (benchmarks/conftest.py rewrites them after every benchmark,
# so a stage stopped at its limit keeps the rows it measured).
bench_rc=0
run_stage() {  # name, limit in seconds, pytest arguments...
  local name=$1 limit=$2; shift 2
  echo "== benchmarks: $name (limit ${limit} s)"
  # --long: the cases marked long (opt-in on a CPU machine) run here as they always did
  UNIGEN_BENCH_NAME=$name timeout "$limit" "$PY" -m pytest "$@" --benchmark-only --long -q \
    -p no:cacheprovider -p unigen_ours_first --benchmark-columns=mean,min,rounds 2>&1 \
    | tee "$RESULTS/benchmarks_$name.log"
  local rc=${PIPESTATUS[0]}
  case "$rc" in
    0) ;;
    5) echo "$name: no benchmark selected" ;;
    124) echo "$name: stopped at its ${limit} s limit (rows measured so far are kept)"; bench_rc=$rc ;;
    *) bench_rc=$rc ;;
  esac
  bundle
}

# The best configuration per case of the tile sweeps: the fastest row of each (benchmark,
# case), with the tile parameters it recorded.
best_tiles() {
  "$PY" - "$RESULTS/benchmarks_gpu_tile_sweeps.json" "$RESULTS/tile_sweep_best.md" <<'PYEOF'
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
  # the three headline comparisons (the stage limits and the tests' 100 s: under 4 minutes)
  run_stage attention 45 benchmarks/test_bench_attention.py -k "test_attention_fwd_bwd and (ours \
or (prefix and (flex or sdpa_padded)) or (causal and (flash_attn or torch_varlen)))"
  run_stage cross_entropy 40 benchmarks/test_bench_cross_entropy.py \
    -k "test_cross_entropy_fwd_bwd and N20480"
  run_stage contrastive 40 benchmarks/test_bench_contrastive.py \
    -k "test_contrastive_fwd_bwd_mining and B4096"
else
  # (the stage limits and the GPU tests' 120 s add up to the script's 8 minutes)
  run_stage cross_entropy 90 benchmarks/test_bench_cross_entropy.py -k "not tile_sweep"
  run_stage contrastive 70 benchmarks/test_bench_contrastive.py -k "not tile_sweep"
  run_stage attention 70 benchmarks/test_bench_attention.py -k "not tile_sweep"
  # one UniGen training step of the paper-size model at the per-GPU batch 64: fused, fused
  # from stored ViT features (the feature store's step, goal >= 2x fused), naive
  run_stage train_step 70 benchmarks/test_bench_train_step.py
  # a training step of a 1B-class Llama (random weights, 4096 tokens, bf16), unpatched vs
  # patch_hf_model (and Liger / CCE when carried); needs transformers, skips without it
  run_stage hf_patch 35 benchmarks/test_bench_hf_patch.py
  run_stage tile_sweeps 25 benchmarks/test_bench_attention.py benchmarks/test_bench_contrastive.py \
    benchmarks/test_bench_cross_entropy.py -k tile_sweep
  best_tiles
fi

rm -rf "$PLUGINS"
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc; results in ${FINAL_OUT:-$RESULTS}"
exit $(( tests_rc != 0 || bench_rc != 0 ))
