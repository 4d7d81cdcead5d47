"""``benchmarks/gpu_check.sh``, checked before a GPU sees it: the whole script rehearsed on this
CPU (``--dry-run``: the interpreter, tiny shapes), a stage cut at its limit keeping its failures,
the quick GPU-test list sized to its limit from the sm_90 compile check's seconds, and the order
in which a stage runs its items."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin(load_file_module):
    return load_file_module(ROOT / "benchmarks" / "gpu_check_plugin.py")
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
QUICK_TESTS = ROOT / "benchmarks" / "gpu_quick_tests.txt"
COMPILE_CHECK_36 = ROOT / "benchmarks" / "results" / "compile_check_triton3.6.json"


def _run(tmp_path, *args, env=None, timeout=600):
    out = tmp_path / "out"
    out.mkdir()
    full_env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **(env or {})}
    full_env.pop("TRITON_INTERPRET", None)  # the script sets what it needs
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, out


def _stages(proc):
    lines = proc.stdout.split("== stages\n", 1)[-1].splitlines()
    return {line.split(":")[0]: line for line in lines if ": limit " in line}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_rehearses_every_stage_of_the_full_check(tmp_path):
    proc, out = _run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    stages = _stages(proc)
    assert set(stages) == {"gpu_tests", "benchmarks_cross_entropy", "benchmarks_contrastive",
                           "benchmarks_attention", "benchmarks_train_step",
                           "benchmarks_hf_patch", "benchmarks_tile_sweeps"}, proc.stdout[-3000:]
    for line in stages.values():
        assert "complete" in line and line.endswith(", 0 failed"), line
    # what a GPU session brings back: three files, refreshed after every stage
    assert {p.name for p in out.iterdir()} == {"summary.md", "results.json", "gpu_results.tar.gz"}
    summary = (out / "summary.md").read_text()
    assert "dry run on CPU" in summary and "| ours |" in summary
    merged = json.loads((out / "results.json").read_text())
    assert any(name.startswith("benchmarks_cpu_cross_entropy") for name in merged), sorted(merged)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dry_run_of_the_quick_check_collects_every_curated_gpu_test(tmp_path, plugin):
    """Every node id of the curated list exists (pytest would stop with a usage error
    otherwise), and on this CPU each is collected and skips for want of CUDA."""
    proc, out = _run(tmp_path, "--dry-run", "--quick")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    n = len(plugin.read_node_ids(QUICK_TESTS))
    tests_log = proc.stdout.split("== gpu_tests", 1)[1].split("== benchmarks", 1)[0]
    assert f"{n} skipped" in tests_log, tests_log[-2000:]
    assert set(_stages(proc)) == {"gpu_tests", "benchmarks_attention",
                                  "benchmarks_cross_entropy", "benchmarks_contrastive"}


@pytest.mark.timeout(300)
def test_a_stage_cut_at_its_limit_keeps_its_failures_and_summary(tmp_path):
    """SIGINT at the limit: pytest stops the running test, still prints the short summary with
    the failure found before, and the script carries on, counting the failure."""
    tests = tmp_path / "test_cut.py"
    tests.write_text("import time\n\ndef test_fails():\n    assert 1 == 2\n\n"
                     "def test_hangs():\n    time.sleep(600)\n")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tests}::test_fails  -  1\n{tests}::test_hangs  -  1\n")
    proc, out = _run(tmp_path, "--dry-run", "--quick", "--only=gpu_tests",
                     env={"UNIGEN_GPU_CHECK_TESTS": str(listing),
                          "UNIGEN_GPU_CHECK_TESTS_LIMIT": "20", "DRY_RUN_SCALE": "1"})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert "KeyboardInterrupt" in proc.stdout
    assert re.search(r"^FAILED .*test_cut.py::test_fails", proc.stdout, re.M), proc.stdout[-3000:]
    stage = _stages(proc)["gpu_tests"]
    assert "stopped at its limit" in stage and stage.endswith(", 1 failed"), stage
    assert int(re.search(r"ran (\d+) s", stage).group(1)) < 60


def test_quick_gpu_tests_fit_their_limit_by_the_compile_check_seconds(plugin):
    """The curated list's estimate: overhead + each test's kernels' sm_90 compile seconds (triton
    3.6, the GPU machine's; the slowest specialisation of each) x 1.5 + its other seconds."""
    report = json.loads(COMPILE_CHECK_36.read_text())
    assert report["triton"].startswith("3.6")
    seconds = {}
    for k in report["kernels"]:
        name = f"{k['op']}.{k['kernel']}"
        seconds[name] = max(seconds.get(name, 0.0), k["compile_s"])
    overhead = int(re.search(r"overhead:\s*(\d+)", QUICK_TESTS.read_text()).group(1))
    total = overhead
    for node, kernels, other in plugin.read_curated(QUICK_TESTS):
        names = [] if kernels == "-" else kernels.split(",")
        unknown = [n for n in names if n not in seconds]
        assert not unknown, f"{node}: {unknown} are not kernels of the compile check"
        total += 1.5 * sum(seconds[n] for n in names) + float(other)
    limit = _limits()["q_gpu_tests"]
    assert total <= limit, f"the quick GPU tests need ~{total:.0f} s, their limit is {limit} s"


def _limits():
    block = re.search(r"declare -A LIMIT=\((.*?)\)", SCRIPT.read_text(), re.S).group(1)
    return {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", block)}


def test_stage_limits_add_up_to_the_scripts_promises():
    """Quick: under 4 minutes with ~5 s of start-up per stage; full: about 8 minutes."""
    limits = _limits()
    quick = [v for k, v in limits.items() if k.startswith("q_")]
    full = [v for k, v in limits.items() if not k.startswith("q_")]
    assert sum(quick) + 5 * len(quick) <= 240, quick
    assert sum(full) + 5 * len(full) <= 8 * 60 + 30, full


def _item(nodeid, provider=None):
    callspec = SimpleNamespace(params={"provider": provider}) if provider else None
    return SimpleNamespace(nodeid=nodeid, callspec=callspec)


def test_stage_order_curated_first_ours_first_heavy_compiles_last(plugin):
    items = [
        _item("benchmarks/test_bench_attention.py::test_attention_fwd_bwd[flex-prefix]", "flex"),
        _item("benchmarks/test_bench_attention.py::test_attention_fwd_bwd[sdpa-prefix]", "sdpa"),
        _item("benchmarks/test_bench_attention.py::test_attention_fwd_bwd[ours-prefix]", "ours"),
        _item("tests/model/test_x.py::test_model_on_gpu"),
        _item("tests/kernels/test_a.py::test_gpu_backend[prefix-flex-64]"),
        _item("tests/kernels/test_a.py::test_gpu_triton_compiles_without_graph_breaks"),
        _item("tests/kernels/test_a.py::test_gpu_kernel"),
        _item("tests/kernels/test_b.py::test_listed_second"),
        _item("tests/kernels/test_b.py::test_listed_first"),
        _item("benchmarks/test_bench_cross_entropy.py::test_x[torch.compile-N1]", "torch.compile"),
    ]
    first = {"tests/kernels/test_b.py::test_listed_first": 0,
             "tests/kernels/test_b.py::test_listed_second": 1}
    ranked = sorted(items, key=lambda i: plugin.sort_key(i, first))
    order = [i.nodeid for i in ranked]
    assert order[:2] == ["tests/kernels/test_b.py::test_listed_first",
                         "tests/kernels/test_b.py::test_listed_second"]
    assert order[2].endswith("[ours-prefix]")
    assert [plugin.is_heavy(i) for i in ranked][-4:] == [True] * 4
    assert order.index("tests/kernels/test_a.py::test_gpu_kernel") < order.index(
        "tests/model/test_x.py::test_model_on_gpu")
