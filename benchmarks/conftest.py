"""Shared benchmark plumbing: device info, the results table (peak memory: unigen.memory), the
opt-in long cases and the skip reasons.

Every benchmark parametrises a ``provider`` and puts ``peak_mem_mb`` (extra memory above the
inputs) into ``benchmark.extra_info``. After each benchmark a line with its time (and its ratio
to ours, once ours of that case is measured) is printed; at the end of the session the table of
every group — ratios against our provider ("ours") measured in the same run — is printed and
written as JSON and markdown into ``$OUT`` when set, else ``benchmarks/results/local/`` (see
``results_dir``).

Cases marked ``long`` (minutes each on 2 CPU cores, e.g. the GPT-2 head on CPU) run only with
``--long``: ``pytest benchmarks/ --benchmark-only`` stays within minutes, ``make bench`` (the
README's table) and ``benchmarks/gpu_check.sh`` pass ``--long``.
"""

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

OURS = "ours"
LONG = "long"
NEEDS_CUDA = "needs CUDA"


def missing(module: str) -> str | None:
    """Why ``module`` cannot be compared here — ``"<module> not installed"``, or installed but
    failing to import (with the error) — or None when it imports."""
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{top} not installed"
    try:
        if importlib.util.find_spec(module) is None:  # the package without that submodule
            return f"{top} installed, without {module} in this version"
    except ImportError as e:
        return f"{top} installed but does not import ({type(e).__name__}: {e})"
    try:
        importlib.import_module(module)
    except Exception as e:  # e.g. open_clip without a torchvision built for this torch
        return f"{module} installed but does not import ({type(e).__name__}: {e})"
    return None


def triton_unavailable() -> str | None:
    """Why our Triton kernels cannot be timed here, or None: they run on GPUs, and on a CPU
    only under Triton's interpreter (which times the interpreter, a smoke case)."""
    from unigen.kernels.common.backend import triton_available, triton_interpreting

    if not triton_available():
        return "triton not installed"
    if bench_device().type != "cuda" and not triton_interpreting():
        return f"{NEEDS_CUDA} (or TRITON_INTERPRET=1 for Triton's interpreter on the CPU)"
    return None


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run the benchmark cases marked long (minutes each on 2 CPU "
                          "cores; make bench and gpu_check.sh pass it)")


def pytest_configure(config):
    config.addinivalue_line("markers", f"{LONG}(about): a long case, run only with --long; "
                                       f"about: its time on 2 CPU cores, for the skip reason")
    config.addinivalue_line(
        "markers", "headline: a benchmark's headline case (what gpu_check.sh --quick times)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    for item in items:
        mark = item.get_closest_marker(LONG)
        if mark is not None:
            about = mark.args[0] if mark.args else "minutes"
            item.add_marker(pytest.mark.skip(reason=f"long case ({about} on 2 CPU cores): run "
                                                    f"with --long"))


def optional(provider: str, module: str, attr: str | None = None):
    """The public alternative a provider needs (``module`` or ``module.attr``), or a clean skip
    that says why not: not installed, installed but failing to import against this torch, or
    without ``attr`` (e.g. PyPI's cut-cross-entropy wheel has no ``cut_cross_entropy.transformers``)."""
    reason = missing(module)
    if reason is not None:
        pytest.skip(f"{provider}: {reason}")
    found = importlib.import_module(module)
    if attr is None:
        return found
    try:
        return getattr(found, attr)
    except AttributeError:
        try:  # a submodule that is not imported by its package
            return importlib.import_module(f"{module}.{attr}")
        except Exception as err:
            pytest.skip(f"{provider}: {module} has no {attr} in this version ({type(err).__name__}: {err})")


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
    # check gives each stage one) keeps the rows it measured; and say what was measured, so a
    # long run is readable while it runs, not only at its end.
    rows = write_tables(item.config)
    printed = getattr(item.config, "_unigen_rows_printed", 0)
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    capture = item.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and rows[printed:]:
        # past pytest's output capture, which would hold the lines until the test's report
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write("\n")  # the test's progress mark ("." or PASSED) ends no line
            for row in rows[printed:]:
                reporter.write(f"[bench] {progress_line(row, rows)}\n")
    item.config._unigen_rows_printed = len(rows)


def pytest_sessionfinish(session, exitstatus):
    write_tables(session.config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The comparison table at the end of the run: every case, ratios against ours."""
    rows = collect_rows(config)
    if not rows:
        return
    terminalreporter.write_sep("=", "comparison with the alternatives (this run)")
    for line in markdown_table(run_meta(), rows).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(tables: {results_dir()}; \"ours speed-up\" > 1: ours is faster)")


def collect_rows(config) -> list[dict]:
    """One dict per benchmark measured so far (group, provider, params, times, extra_info)."""
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or not bs.benchmarks:
        return []
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
    return rows


def run_meta() -> dict:
    return {
        "device": device_name(bench_device()),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def write_tables(config) -> list[dict]:
    """benchmarks_<cpu|gpu>[_<UNIGEN_BENCH_NAME>].{json,md} from the benchmarks run so far;
    returns their rows."""
    rows = collect_rows(config)
    if not rows:
        return rows
    meta = run_meta()
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    tag = "gpu" if bench_device().type == "cuda" else "cpu"
    if os.environ.get("UNIGEN_BENCH_NAME"):  # one file per benchmark run (gpu_check.sh)
        tag += "_" + os.environ["UNIGEN_BENCH_NAME"]
    (out / f"benchmarks_{tag}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    (out / f"benchmarks_{tag}.md").write_text(markdown_table(meta, rows))
    return rows


def _version(name):
    try:
        import importlib.metadata as md

        return md.version(name)
    except Exception:
        return None


def _case_key(row: dict) -> tuple[str, str]:
    return row["group"], json.dumps(row["params"], sort_keys=True)


def _ours(items: list[dict]) -> dict | None:
    """Our provider among one case's rows: "ours", else the first whose name starts with it
    (e.g. "ours_torch")."""
    return next((r for r in items if r["provider"] == OURS), None) or next(
        (r for r in sorted(items, key=lambda r: r["provider"]) if r["provider"].startswith(OURS)),
        None)


def progress_line(row: dict, rows: list[dict]) -> str:
    """``group case provider: 326.06 ms (1.40× ours), extra memory 192 MB``."""
    case = ", ".join(f"{k}={v}" for k, v in row["params"].items())
    ours = _ours([r for r in rows if _case_key(r) == _case_key(row)])
    ratio = (f" ({row['mean_ms'] / ours['mean_ms']:.2f}× {ours['provider']})"
             if ours is not None and ours is not row else "")
    mem = row.get("peak_mem_mb")
    mem = f", extra memory {mem:.0f} MB" if isinstance(mem, (int, float)) else ""
    return (f"{row['group']}{' ' + case if case else ''} {row['provider']}: "
            f"{row['mean_ms']:.2f} ms{ratio}{mem}")


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
        keyed.setdefault(_case_key(r), []).append(r)
    for (group, params), items in sorted(keyed.items()):
        ours = _ours(items)
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
