"""Compile our Triton kernels for an H100/H200 (sm_90) without a GPU, with the launchers' tiles.

The interpreter (TRITON_INTERPRET=1) runs kernels as Python and forgives what the GPU compiler
rejects; this pushes every kernel through Triton's real NVIDIA pipeline down to a cubin (with the
ptxas bundled in the triton wheel) and checks that its shared memory fits an sm_90 block. It
prints one line per kernel with the shared memory, registers and spills ptxas reports, which is
also what to look at when tuning tiles before a GPU session:

    python tests/kernels/gpu_compile_check.py attention bf16 64
    python tests/kernels/gpu_compile_check.py cross_entropy bf16
    python tests/kernels/gpu_compile_check.py contrastive bf16 256

The tests run it in a subprocess (``run_sm90_compile`` in conftest.py) because TRITON_INTERPRET=1
replaces ``@triton.jit`` in the test process. It ends with "compiled for sm_90" on success.
"""

import contextlib
import importlib
import io
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, whatever the caller's environment

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Largest dynamic shared memory one block may use on sm_90 (227 KiB): a kernel above it
# compiles but fails to launch with OutOfResources.
SM90_MAX_SHARED_BYTES = 227 * 1024
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_sm90(kernel, arg_type, constexprs: dict, num_warps: int, num_stages: int):
    """Compile ``kernel`` for sm_90. ``arg_type(name)`` gives each runtime argument's Triton type
    ("*bf16", "i32", "fp32", ...). Returns (compiled kernel, ptxas resource line)."""
    signature = {name: ("constexpr" if name in constexprs else arg_type(name))
                 for name in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by the compiler
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    spills = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    usage = f"registers {regs[-1] if regs else '?'}, spill stores {spills[-1] if spills else '?'} B"
    return compiled, usage


# ------------------------------------------------------------------ the kernels of each op


def cross_entropy_kernels(dtype: str):
    m = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")  # tiles
    k = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.triton_kernels")
    # the launchers' pick for the GPT-2 head's D = 768; when tuning, UNIGEN_FLCE_TILE=<name>
    # compiles another of m.TILE_CANDIDATES
    tile = os.environ.get("UNIGEN_FLCE_TILE")
    cfg = m.TILE_CANDIDATES[tile] if tile else m._triton_config(dtype=TORCH_DTYPES[dtype], dim=768)
    pointers = {"target_ptr": "*i64", "order_ptr": "*i32", "n_valid_ptr": "*i32",
                "part_arg_ptr": "*i32", "h_ptr": "*" + dtype, "w_ptr": "*" + dtype,
                "b_ptr": "*" + dtype, "dz_ptr": "*" + dtype}

    def arg_type(name):
        if name.endswith("_ptr"):
            return pointers.get(name, "*fp32")
        return "fp32" if name in ("label_smoothing", "z_loss", "softcap") else "i32"

    # HAS_SOFTCAP: the capped variant (the cap's extra registers are what could spill)
    common = dict(HAS_BIAS=True, HAS_SOFTCAP=True, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
                  BLOCK_D=cfg["BLOCK_D"], GROUP_M=cfg["GROUP_M"],
                  DOT_PRECISION=m._dot_precision(TORCH_DTYPES[dtype]),
                  UPCAST_DOT=False, WIDE_INDEX=False)
    for kernel, extra in ((k._flce_forward_kernel, {"SMOOTHING": True, "STATS": True}),
                          (k._flce_logit_grad_kernel, {})):
        yield kernel, arg_type, {**common, **extra}, cfg["num_warps"], cfg["num_stages"]

    # the row-chunked "mean"/"sum" path: the row kernel (every option on) and, for 16-bit
    # inputs, the compensated dW kernel (fp32 inputs accumulate dW with a cuBLAS addmm)
    rows_cfg = m._rows_config()

    def reduced_arg_types(logits):
        pointers = {"z_ptr": "*" + logits, "target_ptr": "*i64", "arg_ptr": "*i32",
                    "dz_ptr": "*" + dtype, "h_ptr": "*" + dtype, "sum_ptr": "*" + dtype,
                    "comp_ptr": "*bf16"}

        def arg_type(name):
            if name.endswith("_ptr"):
                return pointers.get(name, "*fp32")
            return "fp32" if name in ("label_smoothing", "z_loss", "softcap") else "i32"
        return arg_type

    rows = dict(HAS_SOFTCAP=True, SMOOTHING=True, STATS=True, WRITE_GRAD=True, NARROW=False,
                BLOCK_R=rows_cfg["BLOCK_R"], BLOCK_V=rows_cfg["BLOCK_V"], RN_BF16=False)
    reduced_arg_type = reduced_arg_types(dtype)
    yield k._flce_rows_kernel, reduced_arg_type, rows, rows_cfg["num_warps"], 3
    if dtype != "fp32":  # fp32 logits of 16-bit inputs (autocast), narrowed in place
        yield (k._flce_rows_kernel, reduced_arg_types("fp32"), {**rows, "NARROW": True},
               rows_cfg["num_warps"], 3)
    if dtype != "fp32":
        dw = m._dw_config()
        tiles = dict(BLOCK_V=dw["BLOCK_V"], BLOCK_D=dw["BLOCK_D"], BLOCK_K=dw["BLOCK_K"],
                     UPCAST_DOT=False, WIDE_INDEX=False, RN_SUM=False, RN_COMP=False)
        yield k._flce_dw_kahan_kernel, reduced_arg_type, tiles, dw["num_warps"], dw["num_stages"]


def contrastive_kernels(dtype: str, dim: str):
    cl = importlib.import_module("unigen.kernels.contrastive_loss.launch")  # tiles
    k = importlib.import_module("unigen.kernels.contrastive_loss.triton_kernels")
    block_m, block_n, block_d, num_warps = cl._launch_config(int(dim), TORCH_DTYPES[dtype])

    def arg_type(name):
        if name in ("img_ptr", "txt_ptr", "d_img_ptr", "d_txt_ptr"):
            return "*" + dtype
        if name in ("ids_ptr", "seed_ptr", "part_idx_ptr", "neg_ptr"):
            return "*i64"
        if name in ("ok_ptr", "flag_ptr"):
            return "*i32"
        if name.endswith("_ptr"):
            return "*fp32"
        return "fp32" if name in ("keep", "smooth", "weight_scale", "loss_scale", "eps") else "i32"

    acc = dict(ACC=tl.float32)
    common = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_IEEE=dtype == "fp32",
                  HAS_IDS=True, **acc)
    rows = dict(BLOCK_M=cl._row_block(block_d), BLOCK_D=block_d, **acc)
    # the sweep in its three shapes: sampling without ids or smoothing (the leanest reservoir),
    # sampling with both (every gated reduction on), the argmax without ids
    fwd = (k._fwd_kernel, {"MODE": 1, "HAS_IDS": False, "SMOOTH": False},
           {"MODE": 1, "HAS_IDS": True, "SMOOTH": True}, {"MODE": 2, "HAS_IDS": False, "SMOOTH": False})
    finish = {"BLOCK": 1024, **acc}
    for kernel, constexprs in ((k._prep_kernel, rows),
                               *((fwd[0], {**common, **gates}) for gates in fwd[1:]),
                               (k._fwd_finish_kernel, {**finish, "MODE": 1, "HAS_IDS": False, "SMOOTH": False}),
                               (k._fwd_finish_kernel, {**finish, "MODE": 1, "HAS_IDS": True, "SMOOTH": True}),
                               (k._rows_bwd_kernel, {**common, "SYMMETRIC": True}),
                               (k._rows_bwd_kernel, {**common, "SYMMETRIC": False}),
                               (k._cols_bwd_kernel, common),
                               (k._bwd_finish_kernel, {**rows, "BLOCK_S": 1024})):
        # the launchers' warps (the finish kernel of the forward runs with Triton's default 4)
        warps = 4 if kernel is k._fwd_finish_kernel else num_warps
        yield kernel, arg_type, constexprs, warps, 3  # the launcher's default stages


def attention_kernels(dtype: str, head_dim: str):
    a = importlib.import_module("unigen.kernels.prefix_lm_attention.launch")  # tiles
    k = importlib.import_module("unigen.kernels.prefix_lm_attention.triton_kernels")
    head_dim = int(head_dim)
    cfg = a._triton_config(head_dim, dtype=TORCH_DTYPES[dtype])

    def arg_type(name):
        if name in ("SEQ_ID", "CU", "PLEN"):
            return "*i32"
        if name in ("LSE", "DELTA"):
            return "*fp32"
        if name in ("qk_scale", "sm_scale"):
            return "fp32"
        if name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            return "*" + dtype
        return "i32"

    tiles = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], WIDE_INDEX=False)
    # both launched with Triton's default warps and stages
    yield k._sample_ids_kernel, arg_type, dict(BLOCK=1024), 4, 3
    yield k._bwd_preprocess_kernel, arg_type, tiles, 4, 3
    attend = dict(tiles, BLOCK_N=cfg["BLOCK_N"], DOT=a._dot_mode(TORCH_DTYPES[dtype]))
    for kernel in (k._fwd_kernel, k._bwd_dkdv_kernel, k._bwd_dq_kernel):
        yield kernel, arg_type, attend, cfg["num_warps"], cfg["num_stages"]
    # the per-(sample, head) kernels with the launcher's tiles at UniGen's max_seqlen (75-115
    # tokens -> BLOCK 128); every dtype and head_dim, also those the op sends to the tiled
    # kernels (their numbers say why). When tuning: UNIGEN_SAMPLE_SEQLEN, UNIGEN_SAMPLE_WARPS,
    # UNIGEN_SAMPLE_BLOCK_M try others.
    if head_dim <= 256:
        seqlen = int(os.environ.get("UNIGEN_SAMPLE_SEQLEN", a.PER_SAMPLE_MAX_SEQLEN))
        scfg = a._per_sample_config(seqlen, head_dim, TORCH_DTYPES[dtype])
        warps = int(os.environ.get("UNIGEN_SAMPLE_WARPS", scfg["num_warps"]))
        block_m = int(os.environ.get("UNIGEN_SAMPLE_BLOCK_M", scfg["BLOCK_M"]))
        per_sample = dict(HEAD_DIM=head_dim, BLOCK=scfg["BLOCK"], BLOCK_M=block_m,
                          BLOCK_D=scfg["BLOCK_D"],
                          DOT=a._dot_mode(TORCH_DTYPES[dtype]), WIDE_INDEX=False)
        for kernel in (k._sample_fwd_kernel, k._sample_bwd_kernel):
            yield kernel, arg_type, per_sample, warps, scfg["num_stages"]


OPS = {"cross_entropy": cross_entropy_kernels, "contrastive": contrastive_kernels,
       "attention": attention_kernels}


def main(argv):
    if not argv or argv[0] not in OPS:
        sys.exit(f"usage: gpu_compile_check.py {{{','.join(OPS)}}} DTYPE [DIM]")
    for kernel, arg_type, constexprs, num_warps, num_stages in OPS[argv[0]](*argv[1:]):
        compiled, usage = compile_sm90(kernel, arg_type, constexprs, num_warps, num_stages)
        name = kernel.fn.__name__
        shared = compiled.metadata.shared
        print(f"{name}: warps {num_warps}, stages {num_stages}, shared {shared} B, {usage}")
        assert compiled.asm.get("cubin"), f"{name}: no cubin"
        assert shared <= SM90_MAX_SHARED_BYTES, (
            f"{name}: {shared} B of shared memory, over the {SM90_MAX_SHARED_BYTES} B an sm_90 "
            f"block may use: it would fail to launch")
    print("compiled for sm_90")


if __name__ == "__main__":
    main(sys.argv[1:])
