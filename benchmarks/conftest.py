"""Shared benchmark plumbing: device info and the results table (peak memory: unigen.memory).

Every benchmark parametrises a ``provider`` and puts ``peak_mem_mb`` (extra memory above the
inputs) into ``benchmark.extra_info``. At the end of the session the results of every group are
written as JSON and as a markdown table of ratios against our provider ("ours") measured in the
same run, into ``$OUT`` when set, else ``benchmarks/results/local/`` (see ``results_dir``).
"""

import importlib
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

OURS = "ours"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "headline: a benchmark's headline case (what gpu_check.sh --quick times)")


def optional(provider: str, module: str, attr: str | None = None):
    """The public alternative a provider needs (``module`` or ``module.attr``), or a clean skip
    that says why not: absent, or present but failing to import against this torch or
    transformers (e.g. PyPI's cut-cross-entropy wheel has no ``cut_cross_entropy.transformers``)."""
    try:
        found = importlib.import_module(module)
        return getattr(found, attr) if attr else found
    except Exception as err:  # ImportError, AttributeError, or a broken extension's own error
        name = f"{module}.{attr}" if attr else module
        pytest.skip(f"{provider}: {name} is not usable here ({type(err).__name__}: {err})")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def tiny_shapes() -> bool:
    """``UNIGEN_BENCH_TINY=1`` (``gpu_check.sh --dry-run``): the CPU cases shrink to shapes that
    run in milliseconds, so the whole GPU script can be rehearsed on a CPU in CI."""
    return os.environ.get("UNIGEN_BENCH_TINY") == "1"


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device():
    return bench_device()


def results_dir() -> Path:
    """``$OUT`` when set (``make bench`` and ``gpu_check.sh`` set it to the committed
    ``benchmarks/results/``), else the ignored ``benchmarks/results/local/``: an ad-hoc run of a
    few benchmarks must not overwrite the committed tables of a whole run."""
    out = os.environ.get("OUT")
    return Path(out) if out else Path(__file__).parent / "results" / "local"


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    # Rewrite the tables after every benchmark, so that a run stopped at a time limit (the GPU
    # check gives each stage one) keeps the rows it measured.
    write_tables(item.config)


def pytest_sessionfinish(session, exitstatus):
    write_tables(session.config)


def write_tables(config):
    """benchmarks_<cpu|gpu>[_<UNIGEN_BENCH_NAME>].{json,md} from the benchmarks run so far."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return
    dev = bench_device()
    rows = []
    for b in bs.benchmarks:
        stats = getattr(b, "stats", None)
        stats = getattr(stats, "stats", stats)  # a fixture's Metadata or the Stats itself
        if stats is None or not getattr(stats, "data", None):
            continue
        params = dict(b.params or {})
        rows.append({
            "group": b.group or b.name.split("[")[0],
            "name": b.name,
            "provider": params.pop("provider", b.name),
            "params": {k: str(v) for k, v in params.items()},
            "mean_ms": stats.mean * 1e3,
            "min_ms": stats.min * 1e3,
            "rounds": stats.rounds,
            **{k: v for k, v in b.extra_info.items()},
        })
    if not rows:
        return
    meta = {
        "device": device_name(dev),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if dev.type == "cuda" else "cpu"
    if os.environ.get("UNIGEN_BENCH_NAME"):  # one file per benchmark run (gpu_check.sh)
        tag += "_" + os.environ["UNIGEN_BENCH_NAME"]
    (out / f"benchmarks_{tag}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / f"benchmarks_{tag}.md").write_text(markdown_table(meta, rows))


def _version(name):
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:
        return None


def markdown_table(meta, rows):
    """One line per (group, params, provider): time, ratio to ours (>1 = ours faster), memory.

    "extra memory" is the peak above the inputs; where a benchmark records ``outputs_mb`` (the
    gradients every provider must return), "working memory" is that peak less the outputs.
    """
    lines = [f"Device: {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · {meta['time']}",
             "", "| benchmark | case | provider | mean ms | ours speed-up | extra memory MB "
             "| working memory MB |",
             "|---|---|---|---:|---:|---:|---:|"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["group"], json.dumps(r["params"], sort_keys=True)), []).append(r)
    for (group, params), items in sorted(keyed.items()):
        # our provider: "ours", else the first whose name starts with it (e.g. "ours_torch")
        ours = next((r for r in items if r["provider"] == OURS), None) or next(
            (r for r in sorted(items, key=lambda r: r["provider"]) if r["provider"].startswith(OURS)), None)
        case = ", ".join(f"{k}={v}" for k, v in json.loads(params).items())
        for r in sorted(items, key=lambda r: r["mean_ms"]):
            ratio = f"{r['mean_ms'] / ours['mean_ms']:.2f}×" if ours else "–"
            mem = r.get("peak_mem_mb")
            mem_s = f"{mem:.0f}" if isinstance(mem, (int, float)) else "–"
            outputs = r.get("outputs_mb")
            work_s = (f"{max(0.0, mem - outputs):.0f}" if isinstance(mem, (int, float))
                      and isinstance(outputs, (int, float)) else "–")
            lines.append(f"| {group} | {case} | {r['provider']} | {r['mean_ms']:.2f} | {ratio} "
                         f"| {mem_s} | {work_s} |")
    return "\n".join(lines) + "\n"
