"""The sm_90 build of our kernels, without a GPU (``benchmarks/compile_check.py``): every kernel
the headline calls launch compiles for an H100/H200 as the runtime JIT specialises it at the
benchmark shapes, its dots on Hopper's warpgroup MMA (wgmma) and without local memory, or with
the measured reason it cannot in ``EXPECTED_EXCEPTIONS``.

The interpreter runs kernels as Python and forgives what the GPU compiler rejects; these tests
push them through Triton's real NVIDIA pipeline (the ptxas bundled in the triton wheel). They
run the script in a subprocess: TRITON_INTERPRET=1 replaces @triton.jit in the test process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from unigen.kernels.common.backend import triton_available

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "compile_check.py"

# What the headline calls launch (kernels/<op>/op.py at the benchmarks' shapes).
HEADLINE_KERNELS = {
    "attention._sample_fwd_kernel", "attention._sample_bwd_kernel",
    "attention._sample_ids_kernel", "attention._fwd_kernel", "attention._bwd_preprocess_kernel",
    "attention._bwd_dkdv_kernel", "attention._bwd_dq_kernel",
    "contrastive._prep_kernel", "contrastive._fwd_kernel", "contrastive._fwd_finish_kernel",
    "contrastive._rows_bwd_kernel", "contrastive._bwd_finish_kernel",
    "cross_entropy._flce_rows_kernel", "cross_entropy._flce_dw_kahan_kernel",
    "cross_entropy._flce_forward_kernel", "cross_entropy._flce_logit_grad_kernel",
}


@pytest.fixture(scope="module")
def check(load_file_module):
    return load_file_module(SCRIPT)


def _needs_compiler():
    if not triton_available():
        pytest.skip("needs triton")
    import triton

    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("triton's bundled ptxas is missing")


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile every time
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled for sm_90" in proc.stdout, (
        proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.stdout


@pytest.mark.timeout(600)
def test_quick_check_puts_every_headline_kernel_on_hopper_fast_path(tmp_path, check):
    _needs_compiler()
    report_file, ptx_dir = tmp_path / "report.json", tmp_path / "ptx"
    _run(tmp_path, "--quick", "--json", str(report_file), "--ptx-dir", str(ptx_dir))
    report = json.loads(report_file.read_text())
    assert report["mode"] == "quick" and report["target"] == "sm_90"
    kernels = report["kernels"]
    assert {f"{k['op']}.{k['kernel']}" for k in kernels} == HEADLINE_KERNELS
    for k in kernels:
        assert (ptx_dir / k["ptx_file"]).read_text().startswith("//"), k["ptx_file"]
        assert k["registers"] is not None and k["compile_s"] > 0
        name = f"{k['op']}.{k['kernel']}"
        problems = check.problems(check.KernelReport(**k))
        assert not problems or check.expected_exception(name, k["scenario"]), (
            f"{name} ({k['scenario']}): {'; '.join(problems)}; fix its tiles or give the measured "
            f"reason in EXPECTED_EXCEPTIONS")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("op", ["attention", "contrastive", "cross_entropy"])
def test_every_scenario_compiles_and_fits_a_block(op, tmp_path):
    """The other shapes and options (fp32, head_dim 128, ids and smoothing, the distributed
    sweep, autocast's fp32 logits, softcap...): each compiles and its shared memory fits an
    sm_90 block (the script fails otherwise)."""
    _needs_compiler()
    out = _run(tmp_path, "--only", op)
    assert f"\n{op}: " in out


def test_ptx_analysis_reads_vector_widths_and_matrix_instructions(check):
    ptx = """
	ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	@%p1 ld.global.nc.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
	ld.global.b16 %rs1, [ %rd3 + 0 ];
	@!%p2 st.global.v2.b16 [ %rd4 + 0 ], { %rs2, %rs3 };
	cp.async.cg.shared.global [ %r7 + 0 ], [ %rd5 + 0 ], 0x10, %r8;
	cp.async.commit_group;
	cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r9], [%rd6, {%r1, %r2}], [%r10];
	wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};
"""
    assert check.analyse_ptx(ptx) == dict(wgmma=1, mma_sync=1, widest_load=16, widest_store=4,
                                          cp_async=1, cp_async_bulk=1)
    log = ("ptxas info    : Function properties for _k\n"
           "    16 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers")
    assert check.analyse_ptxas_log(log) == dict(registers=168, stack_bytes=16, spill_stores=8,
                                                spill_loads=8)
    ttir = ("tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x64xbf16> * tensor<64x64xbf16>\n"
            "tt.dot %a, %b, %c : tensor<32x64xf32> * tensor<64x32xf32> -> tensor<32x32xf32>")
    assert check.analyse_ttir(ttir) == dict(dots=1, fp32_dots=1)
