"""Launchers of the fused cross-entropy's Triton kernels, their tile configs and budgets.

- ``reduction="none"``: :func:`triton_forward` and :func:`triton_backward`, with the tile
  candidates ``TILE_CANDIDATES`` (one pick per shape class, cached) and the backward's dZ chunk
  (``DZ_BUDGET_BYTES``);
- ``"mean"``/``"sum"``: :func:`triton_forward_reduced`, which follows the cost model of
  :mod:`.cost_model` (row blocks: a tensor-core GEMM for the logits, the row kernel, a GEMM for
  dH and the compensated dW kernel; or vocabulary chunks through the kernels above), with the
  launch options of its two kernels.

The accounting (FLOPs, bytes, launches, working memory) is in each launcher's docstring. The
budgets, the caches and ``_wide_index`` are module globals read at call time: tests patch them
here.
"""

from __future__ import annotations

import math

import torch

from ..common.backend import triton_available, triton_interpreting
from ..common.checks import needs_wide_index
from . import cost_model
from .checks import OP

if triton_available():
    import triton

    from .triton_kernels import (
        _flce_dw_kahan_kernel,
        _flce_forward_kernel,
        _flce_logit_grad_kernel,
        _flce_rows_kernel,
    )


# Candidate tiles of the reduction="none" kernels (BLOCK_N rows × BLOCK_V vocabulary × BLOCK_D,
# GROUP_M row blocks per group of the launch order). ``_triton_config`` picks one per shape class;
# ``benchmarks/test_bench_cross_entropy.py::test_ours_tile_sweep`` times them all on a GPU (the
# winner becomes the pick below). Registers/spills from the sm_90 compile check
# (``benchmarks/compile_check.py``, before its specialisation: these rows are the unspecialised
# build), forward / logit-gradient kernel, both with bias and softcap:
TILE_CANDIDATES = {
    # Cut Cross-Entropy's tile; 16 warps: 128 registers, no spills in either kernel (the 16-bit pick)
    "n128v128d32g8w16s3": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, GROUP_M=8, num_warps=16, num_stages=3),
    # the same at 8 warps: 255 registers, forward no spills, logit gradient 4 bytes
    "n128v128d32g8w8s4": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, GROUP_M=8, num_warps=8, num_stages=4),
    # a 16-wide K step at 8 warps: no spills
    "n128v128d16g8w8s4": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=16, GROUP_M=8, num_warps=8, num_stages=4),
    # 64-row tiles at 8 warps: no spills (189 / 254 registers)
    "n64v128d32g8w8s3": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=32, GROUP_M=8, num_warps=8, num_stages=3),
    # the previous default (64×128×64 in row-major order), kept as the fp32 pick
    "n64v128d64g1w8s3": dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, GROUP_M=1, num_warps=8, num_stages=3),
}
# Under the CPU interpreter small tiles are faster (GROUP_M=2 still runs the grouped order).
INTERPRETER_TILES = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, GROUP_M=2, num_warps=4, num_stages=1)
_CONFIG_CACHE: dict = {}


def _shape_class(dtype, dim):
    """What the tile choice depends on: the operand width and whether D fills a 32-wide K step."""
    width = "fp32" if dtype in (torch.float32, torch.float64) else "16bit"
    return width, "narrow" if dim is not None and dim < 32 else "wide"


def _select_config(dtype, dim, interpreting):
    """The tiles for one shape class and D (cached: a dict lookup per launch after the first).

    16-bit on GPUs: GROUP_M, the row blocks of a group in the launch order, comes from D
    (``cost_model.group_rows``): the largest group whose rows of H fit 16 MiB of L2 (64 at
    D = 768, 16 at D = 4096), since each group streams all of W from HBM once. At the Llama-3
    head (N = 8192, D = 4096, V = 128256) the former GROUP_M = 8 meant 8 passes over its 1 GB
    W per sweep, 16 instead of 4 for the forward and the gradient kernels together."""
    key = (interpreting, *_shape_class(dtype, dim), dim)
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        if interpreting:
            cfg = dict(INTERPRETER_TILES)
        elif key[1] == "16bit":
            cfg = dict(TILE_CANDIDATES["n128v128d32g8w16s3"])
            if dim:
                cfg["GROUP_M"] = cost_model.group_rows(dim, 2, cfg["BLOCK_N"])
        else:
            # fp32 operands take twice the shared memory and registers per tile: 64 rows
            cfg = dict(TILE_CANDIDATES["n64v128d64g1w8s3"])
        if key[2] == "narrow":  # D < 32: a 16-wide K step wastes no half of each load
            cfg["BLOCK_D"] = 16
        _CONFIG_CACHE[key] = cfg
    return cfg


def _triton_config(override: dict | None = None, dtype=None, dim=None) -> dict:
    """Tiles and launch options of both reduction="none" kernels for inputs of ``dtype`` with
    hidden size ``dim`` (see ``TILE_CANDIDATES``; chosen per shape class and cached). 16-bit on
    GPUs: 128×128×32 tiles, GROUP_M from D (``_select_config``), 16 warps, 3 stages; fp32:
    64×128×64 at 8 warps, 3 stages. Not yet timed on a GPU: ``override`` lets the benchmarks
    try the other candidates.
    """
    cfg = dict(_select_config(dtype, dim, triton_interpreting()))
    if override:
        unknown = set(override) - set(cfg)
        if unknown:
            raise ValueError(f"{OP}: unknown Triton config keys {sorted(unknown)}; "
                             f"expected some of {sorted(cfg)}")
        cfg.update(override)
    return cfg


def _dot_precision(dtype):
    # fp32 inputs: exact IEEE products like torch's default matmul (no silent TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast_dot(dtype):
    # Triton's CPU interpreter computes bf16 tl.dot wrongly; there (only) the operands go
    # through fp32, which is exact for bf16 values. GPUs use the native bf16 MMA.
    return dtype == torch.bfloat16 and triton_interpreting()


def _emulate_bf16_rounding(dtype):
    # the interpreter truncates fp32 -> bf16 casts (GPUs round to nearest): see _round_to_bf16
    return dtype == torch.bfloat16 and triton_interpreting()


def _compact_rows(target, ignore_index):
    """Valid rows first, and their count as a device tensor: no host sync."""
    valid = target != ignore_index
    order = torch.argsort((~valid).to(torch.int8), stable=True).to(torch.int32)
    n_valid = valid.sum(dtype=torch.int32).reshape(1)
    return order, n_valid


_wide_index = needs_wide_index  # a module name the tests can patch


def _launch(kernel, grid, *args, cfg, **constexprs):
    kernel[grid](*args, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
                 GROUP_M=cfg.get("GROUP_M", 1), num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"], **constexprs)


def triton_forward(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                   softcap=0.0, compacted=None, config=None, stats=True):
    """Row losses, lse and (if ``stats``) argmax-correctness from ``_flce_forward_kernel``.

    Accounting (N valid rows, D, V; 16-bit inputs, the default 128×128×32 tiles):

    - FLOPs: 2·N·D·V for the logit tiles (tensor cores, fp32 accumulation) + 2·N·D for the
      target logits; per logit ~4 elementwise FLOPs and one exp (+ Σz with label smoothing,
      the argmax with ``stats``, the cap's sigmoid with softcap).
    - memory traffic (16-bit operands): a program streams its split of W once and re-reads its
      BLOCK_N rows of H for every vocabulary tile, so L2→SM traffic is
      2·N·D·V·(1/BLOCK_V + 1/BLOCK_N) bytes: N·D·V/32 at 128×128 (64 FLOPs per byte), against
      3·N·D·V/64 with the previous 64×128 tiles. DRAM: of P programs in flight about P/S row
      blocks work on each of the S splits at once and share its W tiles, so W comes from DRAM
      about N·S/(BLOCK_N·P) times while the H in flight is (P/S)·BLOCK_N·D·2 bytes. At the
      GPT-2 head on an H200 (N = 20480, D = 768, V = 50257, S = 7, P ≈ 132 at one program per
      SM): W ~8.5 times (~650 MB, ~0.14 ms at 4.8 TB/s) against ~2.6 ms of tensor-core work at
      600 TFLOP/s, H 3.7 MB in flight: compute-bound. The previous order (all row blocks of a
      split first) read W ~1.2 times but held P row blocks of H in flight (26 MB at D = 768,
      138 MB at D = 4096, more than the 50 MB L2, re-read for every vocabulary tile). The
      logits never leave registers. Writes: S·N fp32 partial lse (and S·N for Σz / the argmax
      when asked) and N target logits.
    - launches: 1 kernel + the merge in torch (logsumexp over S, ~6 small elementwise ops,
      two index_put scatters back to the original row order) + ``_compact_rows`` (3 ops).
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _triton_config(config, hidden.dtype, dim)
    block_n, block_v = cfg["BLOCK_N"], cfg["BLOCK_V"]
    order, n_valid = compacted if compacted is not None else _compact_rows(target, ignore_index)
    # Split the vocabulary so that (row blocks × splits) fills the GPU even for small N; each
    # split's partial lse is merged below (the partial buffers are [splits, N] floats: tiny).
    row_blocks = triton.cdiv(n, block_n)
    splits = max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(1024, row_blocks)))
    vocab_per_split = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, vocab_per_split)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    part_lse = torch.full((splits, n), -math.inf, **f32)
    part_best = torch.full((splits, n) if stats else (1,), -math.inf, **f32)
    part_arg = torch.zeros((splits, n) if stats else (1,), dtype=torch.int32, device=hidden.device)
    zt_c = torch.zeros(n, **f32)
    part_zsum = torch.zeros((splits, n), **f32) if label_smoothing > 0 else zt_c
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    _launch(
        _flce_forward_kernel, (row_blocks * splits,),
        hidden, weight, bias if bias is not None else weight, target, order, n_valid,
        part_lse, part_best, part_arg, zt_c, part_zsum,
        n, vocab, dim, vocab_per_split, splits,
        hidden.stride(0), weight.stride(0), float(softcap) if softcap > 0 else 1.0,
        cfg=cfg, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, SMOOTHING=label_smoothing > 0,
        DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=_upcast_dot(hidden.dtype),
        WIDE_INDEX=_wide_index(hidden, weight), STATS=stats,
    )
    # Partials are indexed by compacted position; scatter back to the original rows.
    lse_c = torch.logsumexp(part_lse, dim=0)
    loss_c = lse_c - (1.0 - label_smoothing) * zt_c
    if label_smoothing > 0:
        loss_c = loss_c - (label_smoothing / vocab) * part_zsum.sum(dim=0)
    if z_loss > 0:
        loss_c = loss_c + z_loss * lse_c * lse_c
    order_l = order.long()
    valid_c = torch.arange(n, device=hidden.device) < n_valid
    tgt_c = target.index_select(0, order_l)
    loss = torch.zeros(n, **f32).index_put_((order_l,), torch.where(valid_c, loss_c, 0.0))
    lse = torch.zeros(n, **f32).index_put_((order_l,), torch.where(valid_c, lse_c, 0.0))
    if not stats:
        return loss, lse, torch.zeros(0, dtype=torch.bool, device=hidden.device)
    best_split = part_best.argmax(dim=0, keepdim=True)  # first split wins ties, as torch.argmax
    arg_c = part_arg.gather(0, best_split).squeeze(0)
    correct = torch.zeros(n, dtype=torch.bool, device=hidden.device).index_put_(
        (order_l,), valid_c & (arg_c.long() == tgt_c.long()))
    return loss, lse, correct


def triton_backward(grad_rows, hidden, weight, bias, target, lse, ignore_index, label_smoothing,
                    z_loss, need_hidden, need_weight, need_bias, softcap=0.0, compacted=None,
                    config=None, chunk=None):
    """Gradients for hidden, weight and bias, one vocabulary chunk at a time.

    Working memory beyond the gradients themselves: the fp32 dH accumulator (4·N·D bytes; one
    rounding at the end instead of one per chunk) and one dZ chunk (~``DZ_BUDGET_BYTES``, or
    ``chunk`` columns: the reduced path sizes it by its cost model).

    Accounting (N rows, D, V; chunk C = ``_backward_vocab_chunk`` columns, V/C chunks):

    - FLOPs: 2·N·D·V to recompute the logit tiles, then per chunk the GEMMs dH += dZ·W_c and
      dW_c = dZᵀ·H: 6·N·D·V here, 8·N·D·V with the forward's 2·N·D·V; ~6 elementwise FLOPs and
      one exp per logit, no row reduction in the kernel (lse is the forward's).
    - memory traffic: the kernel reads (BLOCK_N + BLOCK_V)·D operands per tile, in all
      2·N·D·V·(1/BLOCK_V + 1/BLOCK_N) bytes of L2→SM traffic (16-bit), and writes N·C 16-bit
      dZ per chunk; the two GEMMs read dZ once each, plus W_c and H; dH (fp32) is read and
      written once per chunk. In all ~3·N·V·2 bytes of dZ traffic and (V/C)·N·D·4·2 bytes of
      dH accumulator traffic.
    - launches per chunk: 1 kernel + 2 GEMMs (+ 1 reduction for the bias gradient); plus the
      zeroing of dZ and dH and the final cast of dH.

    No gradient filtering (Cut Cross-Entropy skips a tile whose softmax is below a threshold):
    it pays there because that kernel multiplies each tile into dH and dW itself, so a skipped
    tile skips 4·BLOCK_N·BLOCK_V·D FLOPs. Here dZ goes to dense GEMMs, which run over every
    tile anyway, and a skipped tile would still have to be stored as zeros (the buffer is
    reused across chunks): the filter would add error and save nothing.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _triton_config(config, hidden.dtype, dim)
    order, n_valid = compacted if compacted is not None else _compact_rows(target, ignore_index)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    grad_rows = grad_rows.contiguous().float()
    # dZ is kept in the input precision so the two matmuls below run on tensor cores (fp32
    # accumulation inside); the chunk bounds the transient buffer to N × chunk elements. Rows
    # of ignored targets are zero once and never written.
    # (``chunk``: the reduced path's, from its cost model)
    block_v = cfg["BLOCK_V"]
    chunk = (min(-(-chunk // block_v) * block_v, triton.cdiv(vocab, block_v) * block_v) if chunk
             else _backward_vocab_chunk(n, vocab, hidden.element_size(), block_v))
    dz = torch.zeros((n, chunk), dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.zeros((n, dim), dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_w = torch.empty_like(weight) if need_weight else None
    grad_b = torch.empty_like(bias) if need_bias else None
    wide = _wide_index(hidden, weight, dz)
    for v_start in range(0, vocab, chunk):
        width = min(chunk, vocab - v_start)
        _launch(
            _flce_logit_grad_kernel, (triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(width, cfg["BLOCK_V"]),),
            hidden, weight, bias if bias is not None else weight, target, order, n_valid, lse,
            grad_rows, dz,
            n, vocab, dim, v_start, width,
            hidden.stride(0), weight.stride(0), dz.stride(0),
            float(label_smoothing), float(z_loss), float(softcap) if softcap > 0 else 1.0,
            cfg=cfg, HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0,
            DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST_DOT=_upcast_dot(hidden.dtype),
            WIDE_INDEX=wide, RN_BF16=_emulate_bf16_rounding(dz.dtype),
        )
        dz_c = dz[:, :width]
        w_c = weight[v_start:v_start + width]
        if need_hidden:
            _accumulate_mm(grad_h, dz_c, w_c)
        if need_weight:
            torch.mm(dz_c.t(), hidden, out=grad_w[v_start:v_start + width])
        if need_bias:
            grad_b[v_start:v_start + width] = dz_c.float().sum(dim=0).to(bias.dtype)
    del dz  # before the cast below, so the two buffers never coexist
    if need_hidden:
        grad_h = grad_h.to(hidden.dtype)
    return grad_h, grad_w, grad_b


# The "mean"/"sum" path (``triton_forward_reduced``) follows the cost model of
# ``cost_model.plan_reduced``: its strategy ("rows" or "vocab_chunks") and the block or chunk
# that fit a working-memory budget of 1/8 of eager PyTorch's. Read at call time (tests patch
# them here): ``REDUCED_STRATEGY`` forces a strategy; ``REDUCED_WORKING_BYTES`` replaces the
# budget (0: the smallest blocks / chunks); ``MIN_ROW_BLOCK``: the smallest row block.
REDUCED_STRATEGY = None
REDUCED_WORKING_BYTES = None
MIN_ROW_BLOCK = cost_model.MIN_ROW_BLOCK


# Whether torch.mm(..., out_dtype=torch.float32) works here (CUDA, torch >= 2.8); set on the
# first attempt.
_MM_FP32_OUT = None


def _logits_gemm(out, h, w_t, bias, upcast_cache):
    """out = h·w_t (+ bias): in the operands' dtype, or fp32 logits of 16-bit operands (cuBLAS
    writes fp32 straight from its fp32 accumulator; elsewhere, i.e. under the CPU interpreter
    or with torch < 2.8, the operands are upcast: W once per call, kept in ``upcast_cache``)."""
    global _MM_FP32_OUT
    if out.dtype == h.dtype:
        if bias is not None:
            torch.addmm(bias, h, w_t, out=out)
        else:
            torch.mm(h, w_t, out=out)
        return
    done = False
    if h.is_cuda and _MM_FP32_OUT is not False:
        try:
            torch.mm(h, w_t, out_dtype=torch.float32, out=out)
            _MM_FP32_OUT = done = True
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_FP32_OUT = False
    if not done:
        if "w_t" not in upcast_cache:
            upcast_cache["w_t"] = w_t.float()
        torch.mm(h.float(), upcast_cache["w_t"], out=out)
    if bias is not None:
        out.add_(bias)


def _rows_config():
    """Launch options of ``_flce_rows_kernel``: one row per program, a 4096-wide tile (13 tiles
    per pass at V = 50257) and 16 warps, 8 logits per thread per tile (one 16-byte vector of
    bf16 logits, the padded rows let the sm_90 build use them): the kernel is bound by memory,
    so each program keeps many loads in flight."""
    if triton_interpreting():
        return dict(BLOCK_R=16, BLOCK_V=128, num_warps=4)  # its cost is per program and op
    return dict(BLOCK_R=1, BLOCK_V=4096, num_warps=16)


def _dw_config():
    """Tiles of ``_flce_dw_kahan_kernel``: 128×128 dW tiles, a K step of 64 rows (the cost
    model's row blocks have thousands: 80 steps at the GPT-2 head's 5120), 8 warps, 3 stages.
    With blocks that long the kernel is a GEMM bound by its MMA, not by its epilogue's 8 bytes
    per dW element. The sm_90 compile check at the GPT-2 head (triton 3.6 and 3.9): 228
    registers, 64 KB of shared memory, wgmma, no local memory; 128×64×32 (the tile of the former
    224-row blocks) 104 registers with twice the dZ traffic from L2 per FLOP; 128×256 and
    256×128 spill ~400 B (the epilogue holds the fp32 accumulator and both 16-bit buffers), and
    so does 128×128 at 4 warps. Not yet timed on a GPU."""
    if triton_interpreting():
        return dict(BLOCK_V=32, BLOCK_D=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_V=128, BLOCK_D=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _launch_rows_kernel(z, dz, tgt, scale, loss, lse, arg, label_smoothing, z_loss, softcap, stats,
                        write_grad):
    """``dz`` is ``z`` itself or, for fp32 logits of 16-bit inputs, the 16-bit view of its
    memory that the gradient narrows into (see the kernel)."""
    cfg = _rows_config()
    n_rows, vocab = z.shape
    narrow = dz.dtype != z.dtype
    assert dz.data_ptr() == z.data_ptr() and dz.shape == z.shape
    assert not narrow or (z.dtype == torch.float32 and dz.stride(0) == 2 * z.stride(0))
    # the row stride bounds the memory accesses (the padded buffer of triton_forward_reduced:
    # a multiple of 64 elements, so the masks hold over whole 16-byte vectors)
    _flce_rows_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
        z, dz, tgt, scale, loss, lse, arg,
        n_rows, vocab, z.stride(0), z.stride(0), dz.stride(0), float(label_smoothing), float(z_loss),
        float(softcap) if softcap > 0 else 1.0,
        HAS_SOFTCAP=softcap > 0, SMOOTHING=label_smoothing > 0, STATS=stats,
        WRITE_GRAD=write_grad, NARROW=narrow, BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"],
        RN_BF16=_emulate_bf16_rounding(dz.dtype), num_warps=cfg["num_warps"])


def _launch_dw_kahan(dz, h, grad_w, comp):
    """grad_w (16-bit) += dzᵀ·h with compensation ``comp`` (bf16); see the kernel."""
    cfg = _dw_config()
    k_rows, vocab = dz.shape
    dim = h.shape[1]
    grid = (triton.cdiv(dim, cfg["BLOCK_D"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    _flce_dw_kahan_kernel[grid](
        dz, h, grad_w, comp, k_rows, vocab, dim, dz.stride(0), h.stride(0), grad_w.stride(0),
        BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"],
        UPCAST_DOT=_upcast_dot(dz.dtype), WIDE_INDEX=_wide_index(dz, grad_w),
        RN_SUM=_emulate_bf16_rounding(grad_w.dtype), RN_COMP=_emulate_bf16_rounding(comp.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def reduced_plan(n, dim, vocab, dtype, need_hidden, need_weight, need_bias, fp32_logits=False,
                 strategy=None, row_block=None):
    """The cost model's plan for one reduced call (``cost_model.plan_reduced``) with this
    module's overrides (``REDUCED_STRATEGY``, ``REDUCED_WORKING_BYTES``, ``MIN_ROW_BLOCK``, read
    at call time)."""
    elem = torch.empty((), dtype=dtype).element_size()
    narrow = fp32_logits and dtype != torch.float32
    return cost_model.plan_reduced(
        n, dim, vocab, elem, logits_elem=4 if narrow else elem, need_hidden=need_hidden,
        need_weight=need_weight, need_bias=need_bias, budget=REDUCED_WORKING_BYTES,
        strategy=strategy or REDUCED_STRATEGY, rows=row_block, min_rows=MIN_ROW_BLOCK)


@torch.no_grad()  # gradients by hand: no autograd graph, whoever calls it
def triton_forward_reduced(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing,
                           z_loss, need_hidden, need_weight, need_bias, softcap=0.0, stats=True,
                           row_block=None, fp32_logits=False, strategy=None):
    """``Σ_n row_scale_n·loss_n``, its lse (and argmax statistic when ``stats``) and, when asked,
    the gradients of hidden, weight and bias, from one call (the backward only rescales the
    gradients by the upstream scalar). Two strategies, chosen per shape by the cost model of
    :mod:`.cost_model` (its docstring has the FLOP, byte and memory accounting of both and of
    eager PyTorch; ``strategy`` or ``REDUCED_STRATEGY`` force one):

    **rows** (Liger-Kernel's scheme), per block of R rows (valid rows first, in
    ``_compact_rows`` order; no host sync):

    1. logits ``Z = H_b·Wᵀ (+ b)`` by a tensor-core GEMM (torch) into one reused [R, V] buffer
       in the input dtype, its row stride padded to a multiple of 64 elements
       (``cost_model.LOGITS_ROW_ALIGN``) so that the row kernel moves 16-byte vectors;
    2. ``_flce_rows_kernel``: lse, loss (label smoothing, z-loss, softcap, the row scale =
       token weight) and dZ written over Z in place;
    3. ``dH_b = dZ·W`` by a GEMM, written once into its rows of dH (index_copy);
    4. dW += dZᵀ·H_b: an fp32 addmm for fp32 inputs, otherwise ``_flce_dw_kahan_kernel``
       (compensated 16-bit accumulation: dW's error stays that of one rounding however many
       blocks are added); db += Σ_rows dZ (an fp32 reduction reading dZ, no fp32 copy).

    6·N·D·V FLOPs; launches per block: 2 GEMMs + the row kernel + the dW kernel (+ a gather of
    H_b, the index_copy of dH_b, the bias reduction). At the GPT-2 head (N = 20480, D = 768,
    V = 50257, bf16): 4 blocks of 5120 rows, 14.4 GB modelled HBM traffic against eager's 18.9,
    609 MB of working memory (the 515 MB block, dW's 77 MB compensation) against eager's 6.2 GB
    (before: 92 blocks of 224 rows in ~100 MB, which re-read W and dW 92 times: ~55 GB).

    **vocab_chunks**: the ``reduction="none"`` kernels with ``row_scale`` as the upstream
    gradient: ``triton_forward`` (lse and loss, no logit written), then per vocabulary chunk
    ``triton_backward``'s dZ kernel and two GEMMs (dH in an fp32 accumulator, dW_c written
    once). 8·N·D·V FLOPs, nothing W-sized accumulated. At the Llama-3 head (N = 8192,
    D = 4096, V = 128256, bf16): 4 chunks of 32128 columns, 19.2 GB against eager's 22.3,
    663 MB against 6.3 GB; "rows" cannot fit there (dW's compensation alone is 1.05 GB).

    ``fp32_logits`` (set under autocast, whose loss is fp32: the logits are then those of
    fp32 math on the cast inputs, as the contract of :mod:`unigen.kernels.common.autocast`
    says): "rows" writes fp32 logits of the 16-bit operands and the row kernel narrows the
    gradient to 16 bits in place, so dH and dW still run on 16-bit tensor cores (4 bytes per
    logit: the model gives the block half the rows); "vocab_chunks" computes fp32 logits in any
    case. Without it "rows" gives a 16-bit input 16-bit logits, as PyTorch's own formula.

    Rows with an ignored target sort to the end; the row blocks they fill still run the GEMMs
    (the count of valid rows stays on the device) but get dZ = 0, and their rows of dH are zero;
    the fused kernels skip them.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
    plan = reduced_plan(n, dim, vocab, hidden.dtype, need_hidden, need_weight, need_bias,
                        fp32_logits, strategy, row_block)
    if plan.strategy == "vocab_chunks":
        return _reduced_by_vocab_chunks(hidden, weight, bias, target, row_scale, ignore_index,
                                        label_smoothing, z_loss, need_hidden, need_weight,
                                        need_bias, softcap, stats, plan.chunk)
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    order, n_valid = _compact_rows(target, ignore_index)
    order_l = order.long()
    valid_c = torch.arange(n, device=dev) < n_valid
    # the tail (ignored rows) gets any in-range target and a zero scale: dZ = 0 there
    tgt_c = torch.where(valid_c, target.index_select(0, order_l).long(), 0)
    scale_c = torch.where(valid_c, row_scale.index_select(0, order_l).float(), 0.0)
    need_grad = need_hidden or need_weight or need_bias
    compensated = need_weight and weight.dtype != torch.float32
    narrow = fp32_logits and hidden.dtype != torch.float32
    logits_dtype = torch.float32 if narrow else hidden.dtype
    rows_per_block = min(plan.rows, n)
    # one buffer, rows padded to a multiple of 64 elements (the row kernel's vector accesses)
    padded = torch.empty((rows_per_block, cost_model.padded_width(vocab)), dtype=logits_dtype,
                         device=dev)
    loss_c = torch.empty(n, **f32)
    lse_c = torch.empty(n, **f32)
    arg_c = torch.empty(n if stats else 1, dtype=torch.int32, device=dev)
    grad_h = torch.empty_like(hidden) if need_hidden else None
    grad_w = torch.zeros_like(weight) if need_weight else None
    comp = torch.zeros(weight.shape, dtype=torch.bfloat16, device=dev) if compensated else None
    grad_b = torch.zeros(vocab, **f32) if need_bias else None
    w_t = weight.t()
    upcast_cache = {}
    for start in range(0, n, rows_per_block):
        k = min(rows_per_block, n - start)
        idx = order_l[start:start + k]
        h = hidden.index_select(0, idx)
        z = padded[:k, :vocab]
        _logits_gemm(z, h, w_t, bias, upcast_cache)
        # the gradient's 16-bit view of the same memory when the logits are fp32 (narrowed)
        dz = padded.view(hidden.dtype)[:k, :vocab] if narrow else z
        _launch_rows_kernel(z, dz, tgt_c[start:], scale_c[start:], loss_c[start:], lse_c[start:],
                            arg_c[start:] if stats else arg_c, label_smoothing, z_loss, softcap,
                            stats, need_grad)
        if narrow and dev.type == "cpu" and need_grad:
            # oneDNN's bf16 GEMM on this view (row stride 2V, K not a multiple of 32) returned NaN
            # rows on some CPUs (issue 28): the interpreter's CPU path multiplies a dense copy
            dz = dz.contiguous()
        if need_hidden:
            grad_h.index_copy_(0, idx, torch.mm(dz, weight))
        if need_weight:
            if compensated:
                _launch_dw_kahan(dz, h, grad_w, comp)
            else:
                torch.addmm(grad_w, dz.t(), h, out=grad_w)  # counted, as in the CPU path
        if need_bias:
            grad_b += dz.sum(dim=0, dtype=torch.float32)
    del padded
    if compensated:
        grad_w.sub_(comp)  # sum - compensation, rounded once
    total = torch.where(valid_c, scale_c * loss_c, 0.0).sum()
    lse = torch.zeros(n, **f32).index_put_((order_l,), torch.where(valid_c, lse_c, 0.0))
    if stats:
        correct = torch.zeros(n, dtype=torch.bool, device=dev).index_put_(
            (order_l,), valid_c & (arg_c.long() == tgt_c))
    else:
        correct = torch.zeros(0, dtype=torch.bool, device=dev)
    return (total, lse, correct, grad_h, grad_w,
            grad_b.to(bias.dtype) if need_bias else None)


def _reduced_by_vocab_chunks(hidden, weight, bias, target, row_scale, ignore_index,
                             label_smoothing, z_loss, need_hidden, need_weight, need_bias, softcap,
                             stats, chunk):
    """The "vocab_chunks" strategy of :func:`triton_forward_reduced`: the fused kernels of
    ``reduction="none"`` with the row scale as the upstream gradient, in ``chunk`` columns."""
    compacted = _compact_rows(target, ignore_index)
    loss, lse, correct = triton_forward(hidden, weight, bias, target, ignore_index,
                                        label_smoothing, z_loss, softcap, compacted=compacted,
                                        stats=stats)
    scale = row_scale.float()
    total = torch.where(target != ignore_index, scale * loss, 0.0).sum()
    grads = (None, None, None)
    if need_hidden or need_weight or need_bias:
        grads = triton_backward(scale, hidden, weight, bias, target, lse, ignore_index,
                                label_smoothing, z_loss, need_hidden, need_weight, need_bias,
                                softcap, compacted=compacted, chunk=chunk)
    return (total, lse, correct, *grads)


# Whether torch.addmm(..., out_dtype=torch.float32) works here (CUDA, torch >= 2.8); set on the
# first attempt.
_ADDMM_FP32_OUT = None
# Rows per block of the fallback below: bounds its fp32 temporary to 4096·D floats.
_ACCUMULATE_ROWS = 4096


def _accumulate_mm(acc, a, b):
    """acc (fp32) += a @ b for 16-bit a, b: one rounding per chunk, no [N, D] temporary.

    On CUDA the GEMM accumulates straight into the fp32 ``acc`` (cuBLAS with an fp32 C matrix:
    ``addmm(out_dtype=float32)``), so each vocabulary chunk costs one read and one write of
    ``acc`` and no extra memory. Elsewhere (or with an older torch) the product is formed in row
    blocks of ``_ACCUMULATE_ROWS``, which bounds the temporary to a few MB instead of a second
    [N, D] fp32 buffer (60 MiB at N = 20480, D = 768).
    """
    global _ADDMM_FP32_OUT
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_FP32_OUT is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_FP32_OUT = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_FP32_OUT = False
    for r in range(0, a.shape[0], _ACCUMULATE_ROWS):
        acc[r:r + _ACCUMULATE_ROWS].add_(torch.mm(a[r:r + _ACCUMULATE_ROWS], b).float())


# The dZ chunk of the Triton backward. With the fp32 dH accumulator it sets the working memory:
# at N = 20480, D = 768 (the GPT-2 head of one GPU step) 60 MiB + 20 MiB (a 512-column chunk),
# under 100 MB.
DZ_BUDGET_BYTES = 24 * 2**20


def _backward_vocab_chunk(n, vocab, elem_size, block_v):
    """Largest vocabulary chunk (a multiple of the tile) whose dZ buffer fits the budget."""
    budget_bytes = DZ_BUDGET_BYTES  # read at call time (tests shrink it)
    cols = max(block_v, (budget_bytes // max(1, n * elem_size)) // block_v * block_v)
    return min(cols, triton.cdiv(vocab, block_v) * block_v)
