"""What the GPU will build: every Triton kernel the headline calls launch, compiled for an
H100/H200 (sm_90) on a machine without a GPU, specialised exactly as the runtime JIT specialises
it at the benchmark shapes.

    python benchmarks/compile_check.py [--quick] [--json FILE] [--ptx-dir DIR] [--only TEXT]

How: a stand-in Triton driver reports an sm_90 device, and the real launchers of each op run on
``meta`` tensors of the benchmark shapes (no memory, no arithmetic: the PyTorch work around the
kernels costs nothing, while shapes, strides, dtypes and the offsets of views are the real
ones). Each ``kernel[grid](...)`` then goes through Triton's own JIT: it specialises the
arguments as on a GPU (a pointer whose address is a multiple of 16 is marked aligned; a meta
tensor's address is its byte offset from a base that a GPU allocation aligns; an integer
divisible by 16 is marked so, 1 becomes a constant), compiles down to a cubin with the ptxas
bundled in the triton wheel, and the stand-in launcher drops the launch. A kernel that a call
launches with several specialisations (a last row block of another size) is compiled once per
specialisation, as the GPU would.

Per compiled kernel it prints registers, local memory (ptxas' stack frame and spill stores), the
shared memory of a block, the dots in the kernel (``tt.dot`` in its Triton IR) and what they
became in the PTX (``wgmma.mma_async``: Hopper's warpgroup MMA; ``mma.sync``: the Ampere-era
instruction), the widest global load and store (bytes per thread and instruction: 16 is a full
vector access), the asynchronous copies (``cp.async``, and ``cp.async.bulk``: the TMA engine)
and the compile seconds. ``--json`` writes the same rows, ``--ptx-dir`` every kernel's PTX as
``<op>.<kernel>[.<n>].ptx``. ``--quick`` compiles the headline calls only (the test runs it);
the default adds the other shapes and options the ops support.

The scenarios below mirror what each op does for the benchmarks' headline calls (the op's own
dispatch is not run: on ``meta`` tensors a custom op runs its fake kernel): keep them in step
with ``kernels/<op>/op.py``. A kernel whose dots do not all reach ``wgmma`` or that uses local
memory must say why in ``EXPECTED_EXCEPTIONS`` (the test holds every headline kernel to this).

Runs with triton 3.6 (the GPU machine's) and newer; needs no CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

if __name__ == "__main__":  # (imported, e.g. by its tests, it leaves the environment alone)
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, whatever the caller's environment
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default, without its warning
    if "TRITON_CACHE_DIR" not in os.environ:  # a real compile (with its ptxas log) every time
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="unigen-compile-check-")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
import triton.compiler as triton_compiler  # noqa: E402
import triton.runtime.errors  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# Largest dynamic shared memory one block may use on sm_90 (227 KiB).
SM90_MAX_SHARED_BYTES = 227 * 1024
SM90_TARGET = GPUTarget("cuda", 90, 32)

# Kernels whose dots do not all compile to wgmma, or that use local memory, at the benchmark
# shapes, with the measured reason. Keyed by "<op>.<kernel>", or "<op>.<kernel>@<text>" for the
# scenarios whose name contains <text> only. None of the headline calls' kernels is here.
EXPECTED_EXCEPTIONS: dict[str, str] = {
    "attention._fwd_kernel@tiled fp32":
        "fp32 inputs take full-precision FMA products (no tensor cores by design, as the fp32 "
        "reference); triton 3.6 leaves an 8 B stack frame at 32 x 32 tiles (3.9 none); fp32 "
        "attention is for tests",
    "attention._bwd_dkdv_kernel@tiled fp32":
        "fp32 FMA dots: two [32, 64] fp32 accumulators beside fp32 q and dO tiles twice as wide "
        "as bf16 ones: 440-512 B of local memory at 32 x 32 (38 KB at 64 x 64); fp32 attention is "
        "for tests",
}


def expected_exception(key: str, scenario: str) -> str:
    for name, why in EXPECTED_EXCEPTIONS.items():
        kernel, _, where = name.partition("@")
        if kernel == key and where in scenario:
            return why
    return ""


# ------------------------------------------------------------------ the stand-in sm_90 driver


class _Launcher:
    """What the driver's launcher would be: here it records the launch and does nothing."""

    launches: list[str] = []

    def __init__(self, src, metadata):
        self.name = getattr(metadata, "name", "?")

    def __call__(self, *args, **kwargs):
        _Launcher.launches.append(self.name)


class _Utils:
    def get_device_properties(self, device):  # an H100 SXM's
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass


class Sm90Driver:
    """Enough of Triton's CUDA driver for the JIT to specialise, compile and 'launch'."""

    utils = _Utils()
    launcher_cls = _Launcher

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return SM90_TARGET


# ------------------------------------------------------------------ what one compile gave


@dataclasses.dataclass
class KernelReport:
    op: str
    scenario: str
    kernel: str
    headline: bool
    num_warps: int
    num_stages: int
    registers: int | None
    stack_bytes: int | None  # local memory per thread (ptxas' stack frame)
    spill_stores: int | None
    spill_loads: int | None
    shared_bytes: int
    dots: int  # tensor-core dots in the Triton IR (16-bit operands, or tf32)
    fp32_dots: int  # full-precision fp32 dots (input_precision="ieee"): FMA by design
    wgmma: int  # wgmma.mma_async in the PTX
    mma_sync: int  # mma.sync in the PTX
    widest_load: int  # bytes per global load instruction (16 = a 128-bit vector)
    widest_store: int
    cp_async: int  # cp.async (Ampere's asynchronous copies)
    cp_async_bulk: int  # cp.async.bulk (the TMA engine)
    compile_s: float
    ptx_file: str = ""
    exception: str = ""

    @property
    def name(self):
        return f"{self.op}.{self.kernel}"


_LD_ST = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global([.\w:]*)\s")


def _access_bytes(suffix: str) -> int:
    """Bytes one ld/st.global moves per thread, from its suffix (``.v4.b32`` -> 16)."""
    parts = [p for p in suffix.split(".") if p]
    vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(m.group(1)) for p in reversed(parts)
                 if (m := re.fullmatch(r"[bufs](\d+)", p))), 0)
    return vec * bits // 8


def analyse_ptx(ptx: str) -> dict:
    widest = {"ld": 0, "st": 0}
    cp_async = cp_bulk = 0
    for line in ptx.splitlines():
        m = _LD_ST.match(line)
        if m:
            widest[m.group(1)] = max(widest[m.group(1)], _access_bytes(m.group(2)))
            continue
        s = line.strip()
        if s.startswith("cp.async.bulk") and "group" not in s:
            cp_bulk += 1
        elif re.match(r"cp\.async\.c[ag]", s):
            cp_async += 1
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                widest_load=widest["ld"], widest_store=widest["st"],
                cp_async=cp_async, cp_async_bulk=cp_bulk)


def analyse_ttir(ttir: str) -> dict:
    """The kernel's dots, from its Triton IR: tensor-core dots (16-bit operands, or fp32 ones at
    tf32 precision) and full-precision fp32 dots, which the GPU runs on FMA units by design."""
    tensor_core = fp32 = 0
    for line in re.findall(r"\btt\.dot\b.*", ttir):
        operand = re.search(r":\s*tensor<[^>]*x(\w+)>", line)
        if operand and operand.group(1) == "f32" and "tf32" not in line:
            fp32 += 1
        else:
            tensor_core += 1
    return dict(dots=tensor_core, fp32_dots=fp32)


def analyse_ptxas_log(log: str) -> dict:
    def last(pattern):
        found = re.findall(pattern, log)
        return int(found[-1]) if found else None
    return dict(registers=last(r"Used (\d+) registers"),
                stack_bytes=last(r"(\d+) bytes stack frame"),
                spill_stores=last(r"(\d+) bytes spill stores"),
                spill_loads=last(r"(\d+) bytes spill loads"))


_SINK: list | None = None  # where the active Recorder collects compiles


def _install_compile_hook():
    """Wrap ``triton.compiler.compile`` once per process: the JIT binds it into each kernel at
    the kernel's first launch, so the wrapper stays and reports to whichever Recorder is
    active."""
    if getattr(triton_compiler.compile, "unigen_recording", False):
        return
    original = triton_compiler.compile

    def compile_and_record(src, target=None, options=None, **kwargs):
        if _SINK is None:
            return original(src, target=target, options=options, **kwargs)
        log = io.StringIO()
        triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v, printed by the compiler
        start = time.perf_counter()
        with contextlib.redirect_stdout(log):
            kernel = original(src, target=target, options=options, **kwargs)
        _SINK.append((kernel, time.perf_counter() - start, log.getvalue()))
        return kernel

    compile_and_record.unigen_recording = True
    triton_compiler.compile = compile_and_record


class Recorder:
    """While active: the stand-in sm_90 driver, and every compile the JIT runs timed, its ptxas
    log captured and the compiled kernel kept for the report (``take``)."""

    def __enter__(self):
        global _SINK
        _install_compile_hook()
        _SINK = []
        # (on a machine without a GPU there is no default driver to go back to)
        self._previous_driver = triton.runtime.driver._active
        triton.runtime.driver.set_active(Sm90Driver())
        return self

    def __exit__(self, *exc):
        global _SINK
        _SINK = None
        triton.runtime.driver._active = self._previous_driver

    def take(self):
        global _SINK
        out, _SINK = _SINK, []
        return out


# ------------------------------------------------------------------ the scenarios


@dataclasses.dataclass
class Scenario:
    op: str
    name: str
    run: Callable[[], None]
    headline: bool = False  # a benchmark's headline call (--quick compiles these)


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _module(name):
    return importlib.import_module(f"unigen.kernels.{name}")


# The attention benchmark's batch (benchmarks/test_bench_attention.py): 512 samples of 75-115
# tokens, 12 heads; the token count is the benchmark's own (its generator, seed 0).
def _attention_batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(75, 116, (512,), generator=g)
    return int(lengths.sum()), int(lengths.max()), 512


def _attention(dtype, head_dim, path):
    def run():
        a = _module("prefix_lm_attention.launch")
        T, max_seqlen, B = _attention_batch()
        q, k, v, do = (_meta(T, 12, head_dim, dtype=dtype) for _ in range(4))
        cu = _meta(B + 1, dtype=torch.int32)
        plen = _meta(B, dtype=torch.int32)
        scale = head_dim ** -0.5
        if path == "per_sample":
            assert a.uses_per_sample_kernels(max_seqlen, head_dim, dtype)
            _, lse = a.triton_sample_forward(q, k, v, cu, plen, scale, max_seqlen)
            a.triton_sample_backward(do, q, k, v, lse, cu, plen, scale, max_seqlen)
        else:  # the tiled kernels (samples over 128 tokens, fp32, head_dim > 64)
            seq_id = a.triton_sample_ids(cu, T)
            out, lse = a.triton_forward(q, k, v, cu, plen, scale, seq_id=seq_id)
            a.triton_backward(do, q, k, v, out, lse, cu, plen, scale, seq_id=seq_id)
    return run


# The contrastive benchmark's headline: B = 4096 pairs, D = 256, one process, sampled negatives.
def _contrastive(dtype, n=4096, dim=256, mode=1, ids=False, smoothing=0.0, n_local=None):
    def run():
        c = _module("contrastive_loss.launch")
        image, text = _meta(n, dim, dtype=dtype), _meta(n, dim, dtype=dtype)
        scale = _meta((), dtype=torch.float32)
        ids_t = _meta(n, dtype=torch.int64) if ids else None
        seeds = _meta(1, dtype=torch.int64) if mode == 1 else None
        local = n if n_local is None else n_local
        row_start = 0 if n_local is None else n - local
        keep, smooth = 1.0 - smoothing, smoothing / n
        inv, ok, _ = c._triton_prep(image, text, scale)
        _, _, lse, pos_cnt, _ = c._triton_fwd(image, text, inv, ids_t, scale, seeds, row_start,
                                              local, keep, smooth, mode, ok)
        acc = torch.float32 if dtype != torch.float64 else torch.float64
        c._triton_bwd(_meta((), dtype=acc), image, text, inv, ids_t, scale, lse, pos_cnt,
                      row_start, keep, smooth)
    return run


# The cross-entropy heads: GPT-2 (the benchmark's N = 20480, D = 768, V = 50257) and a Llama-3
# head (N = 8192, D = 4096, V = 128256), bf16, no bias, the loss's mean.
GPT2_HEAD = (20480, 768, 50257)
LLAMA3_HEAD = (8192, 4096, 128256)


def _cross_entropy(shape, dtype, reduction="mean", autocast=False, bias=False, softcap=0.0,
                   smoothing=0.0, z_loss=0.0):
    def run():
        f = _module("fused_linear_cross_entropy.launch")
        n, d, v = shape
        h, w = _meta(n, d, dtype=dtype), _meta(v, d, dtype=dtype)
        b = _meta(v, dtype=dtype) if bias else None
        y = _meta(n, dtype=torch.int64)
        if reduction == "none":
            _, lse, _ = f.triton_forward(h, w, b, y, -100, smoothing, z_loss, softcap, stats=False)
            f.triton_backward(_meta(n, dtype=torch.float32), h, w, b, y, lse, -100, smoothing,
                              z_loss, True, True, bias, softcap)
        else:
            f.triton_forward_reduced(h, w, b, y, _meta(n, dtype=torch.float32), -100, smoothing,
                                     z_loss, True, True, bias, softcap, stats=False,
                                     fp32_logits=autocast)
    return run


BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

SCENARIOS = [
    # headline calls (--quick)
    Scenario("attention", "per-sample bf16 d64 (the op's path at 75-115 tokens)",
             _attention(BF16, 64, "per_sample"), headline=True),
    Scenario("attention", "tiled bf16 d64 (the same batch)", _attention(BF16, 64, "tiled"),
             headline=True),
    Scenario("contrastive", "B4096 D256 bf16, sampled negatives", _contrastive(BF16),
             headline=True),
    Scenario("cross_entropy", "mean, GPT-2 head bf16", _cross_entropy(GPT2_HEAD, BF16),
             headline=True),
    Scenario("cross_entropy", "mean, Llama-3 head bf16", _cross_entropy(LLAMA3_HEAD, BF16),
             headline=True),
    Scenario("cross_entropy", "none, GPT-2 head bf16",
             _cross_entropy(GPT2_HEAD, BF16, reduction="none"), headline=True),
    # the other shapes and options the ops support
    Scenario("attention", "tiled bf16 d128", _attention(BF16, 128, "tiled")),
    Scenario("attention", "tiled fp32 d64", _attention(FP32, 64, "tiled")),
    Scenario("contrastive", "hardest negatives, ids, label smoothing",
             _contrastive(BF16, mode=2, ids=True, smoothing=0.1)),
    Scenario("contrastive", "distributed rank (1024 of 4096 rows)",
             _contrastive(BF16, n_local=1024)),
    Scenario("contrastive", "fp32", _contrastive(FP32)),
    Scenario("cross_entropy", "mean, GPT-2 head bf16 under autocast (fp32 logits)",
             _cross_entropy(GPT2_HEAD, BF16, autocast=True)),
    Scenario("cross_entropy", "mean, GPT-2 head bf16, bias, softcap, smoothing, z-loss",
             _cross_entropy(GPT2_HEAD, BF16, bias=True, softcap=30.0, smoothing=0.1, z_loss=1e-4)),
    Scenario("cross_entropy", "none, GPT-2 head bf16, bias, softcap, smoothing, z-loss",
             _cross_entropy(GPT2_HEAD, BF16, reduction="none", bias=True, softcap=30.0,
                            smoothing=0.1, z_loss=1e-4)),
    Scenario("cross_entropy", "mean, GPT-2 head fp32", _cross_entropy(GPT2_HEAD, FP32)),
]


# ------------------------------------------------------------------ running and reporting


def run_scenarios(scenarios, ptx_dir: Path | None) -> list[KernelReport]:
    reports: list[KernelReport] = []
    seen: dict[str, int] = {}
    with Recorder() as recorder:
        for scenario in scenarios:
            try:
                scenario.run()
            except triton.runtime.errors.OutOfResources as err:
                # the kernel compiled (it is in the recorder) but would not launch on an sm_90
                # block: its row shows why, and the script fails
                print(f"{scenario.op}: {scenario.name}: {err}")
            for kernel, seconds, log in recorder.take():
                name = kernel.name if hasattr(kernel, "name") else kernel.metadata.name
                key = f"{scenario.op}.{name}"
                seen[key] = seen.get(key, 0) + 1
                ptx = kernel.asm["ptx"]
                ttir = kernel.asm.get("ttir", "")
                report = KernelReport(
                    op=scenario.op, scenario=scenario.name, kernel=name,
                    headline=scenario.headline, num_warps=kernel.metadata.num_warps,
                    num_stages=kernel.metadata.num_stages, shared_bytes=kernel.metadata.shared,
                    compile_s=round(seconds, 2), **analyse_ttir(ttir),
                    **analyse_ptxas_log(log), **analyse_ptx(ptx),
                    exception=expected_exception(key, scenario.name))
                if ptx_dir is not None:
                    suffix = "" if seen[key] == 1 else f".{seen[key]}"
                    path = ptx_dir / f"{key}{suffix}.ptx"
                    path.write_text(ptx)
                    report.ptx_file = path.name
                reports.append(report)
    return reports


def problems(report: KernelReport) -> list[str]:
    """What keeps a kernel off Hopper's fast path (or off the GPU)."""
    out = []
    if report.shared_bytes > SM90_MAX_SHARED_BYTES:
        out.append(f"{report.shared_bytes} B of shared memory (an sm_90 block may use "
                   f"{SM90_MAX_SHARED_BYTES})")
    if report.dots and (report.wgmma == 0 or report.mma_sync):
        out.append(f"{report.dots} dots: {report.wgmma} wgmma, {report.mma_sync} mma.sync")
    if report.stack_bytes or report.spill_stores:
        out.append(f"{report.stack_bytes} B of local memory ({report.spill_stores} B spilled)")
    return out


COLUMNS = ("kernel", "warps", "regs", "local B", "shared KB", "dots", "wgmma", "mma.sync",
           "ld B", "st B", "cp.async", "bulk", "s")


def table(reports: list[KernelReport]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in reports:
        lines.append("| " + " | ".join(str(x) for x in (
            r.name, r.num_warps, r.registers, r.stack_bytes, round(r.shared_bytes / 1024, 1),
            f"{r.dots} + {r.fp32_dots} fp32" if r.fp32_dots else r.dots, r.wgmma, r.mma_sync,
            r.widest_load, r.widest_store, r.cp_async, r.cp_async_bulk, r.compile_s)) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the headline calls only")
    parser.add_argument("--json", type=Path, help="write the report as JSON here")
    parser.add_argument("--ptx-dir", type=Path, help="write each kernel's PTX into this folder")
    parser.add_argument("--only", default="", help="scenarios whose op or name contains this")
    args = parser.parse_args(argv)
    scenarios = [s for s in SCENARIOS if (s.headline or not args.quick)
                 and (args.only in s.op or args.only in s.name)]
    if not scenarios:
        parser.error(f"no scenario matches --only {args.only!r}")
    if args.ptx_dir is not None:
        args.ptx_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    reports = run_scenarios(scenarios, args.ptx_dir)
    seconds = time.perf_counter() - start
    print(f"sm_90 build, triton {triton.__version__}, torch {torch.__version__}: "
          f"{len(reports)} kernels in {seconds:.0f} s")
    for scenario in scenarios:
        rows = [r for r in reports if r.scenario == scenario.name]
        print(f"\n{scenario.op}: {scenario.name}" + (" [headline]" if scenario.headline else ""))
        print(table(rows) if rows else "(every kernel already compiled above)")
    flagged = [(r, p) for r in reports if (p := problems(r))]
    if flagged:
        print("\noff the fast path:")
        for r, p in flagged:
            print(f"- {r.name} ({r.scenario}): {'; '.join(p)}"
                  + (f" -- expected: {r.exception}" if r.exception else ""))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(
            triton=triton.__version__, torch=torch.__version__, target="sm_90",
            mode="quick" if args.quick else "full", seconds=round(seconds, 1),
            kernels=[dataclasses.asdict(r) for r in reports]), indent=1))
    too_big = [r for r in reports if r.shared_bytes > SM90_MAX_SHARED_BYTES]
    print("compiled for sm_90" if not too_big else "some kernels would not launch (shared memory)")
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
