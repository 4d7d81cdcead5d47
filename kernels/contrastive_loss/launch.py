"""Launchers of the fused contrastive loss's Triton kernels: the tile config (``_launch_config``:
register pressure sets the tile, from the sm_90 compile check), the split of the sweeps over the
GPU (``_splits``), and the forward (:func:`_triton_prep`, :func:`_triton_fwd`) and backward
(:func:`_triton_bwd`) launch sequences.

The overrides (``_BLOCK_OVERRIDE``, ``_SPLIT_OVERRIDE``) and the parallelism targets are module
globals read at call time: tests and the GPU tile sweep patch them here.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..common.backend import triton_available, triton_interpreting
from .cpu import _combine_distributed
from .reference import _NORM_EPS, _acc_dtype

if triton_available():
    import triton
    import triton.language as tl

    from .triton_kernels import (
        _bwd_finish_kernel,
        _cols_bwd_kernel,
        _fwd_finish_kernel,
        _fwd_kernel,
        _prep_kernel,
        _rows_bwd_kernel,
    )

# The Triton kernels keep a whole feature row in registers (the row block and its gradient
# accumulator); beyond this width "auto" falls back to the PyTorch path.
_TRITON_MAX_DIM = 1024
# (block_m, block_n[, num_warps]) forced on the Triton launchers: interpreter tests use small tiles on tiny
# shapes, the GPU benchmark sweeps other tiles (test_bench_contrastive.py::test_ours_tile_sweep).
# None = the launcher's choice.
_BLOCK_OVERRIDE: Optional[tuple[int, ...]] = None
# Parallelism of the Triton sweeps (see _splits): ~8 programs per SM of an H100, and the fewest
# tiles one split sweeps (the GPU benchmark sweeps the first too). _SPLIT_OVERRIDE (test-only)
# forces a number of splits.
_TARGET_PROGRAMS = 1024
_MIN_TILES_PER_SPLIT = 4
_SPLIT_OVERRIDE: Optional[int] = None


def _launch_config(dim: int, dtype: torch.dtype):
    """Tile sizes for the Triton kernels: (rows per program, columns per step, BLOCK_D, warps).

    BLOCK_D covers the whole (padded) feature dimension: a query block is loaded once and the
    gradient accumulator of a block stays on chip. bf16/fp16 at D <= 256 take 64-row tiles of
    32 columns at 8 warps: the smallest tile whose dots compile to Hopper's warpgroup MMA
    (``wgmma`` needs 64 rows per warpgroup; 32-row tiles compiled to ``mma.sync``). Measured by
    the sm_90 compile check (``benchmarks/compile_check.py``, B = 4096, D = 256, triton 3.6 /
    3.9): forward sweep 127 / 102 registers, 88 KB of shared memory; backward row sweep 225 /
    194 registers, 80 KB; no local memory. 64 x 64 spills in the backward (4-200 B at 8 warps,
    120-208 at 4), 64 x 32 at 4 warps leaves an 8 B stack frame in the 3.9 forward, 64 x 128
    needs 256 KB of shared memory (over an sm_90 block's 227). The column sweep of the
    distributed backward takes the transposed tile (64 columns per program, 32 rows per step:
    its dots have the columns as M). 64-row tiles give 2·B/64 row blocks (both directions), 128
    at B = 4096, which ``_splits`` multiplies to ~1024 programs.

    D = 512 and 1024 keep 16 x 16 tiles on ``mma.sync`` (8 warps at 1024): the [64, D] fp32
    gradient accumulator of a 64-row tile spills at D = 512 (72-168 B per thread with triton
    3.9). fp32 and fp64 take the full-precision FMA path (no tensor cores by design: TF32 would
    cost up to 0.1 in a logit at scale 100), whose operands are twice as wide: 16 x 16 keeps it
    spill-free.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    half = dtype in (torch.float16, torch.bfloat16)
    if half and block_d <= 256:
        block_m, block_n, num_warps = 64, 32, 8
    else:
        block_m = block_n = 16
        num_warps = 8 if block_d >= 1024 else 4
    if _BLOCK_OVERRIDE is not None:
        block_m, block_n, *warps = _BLOCK_OVERRIDE
        num_warps = warps[0] if warps else num_warps
    return block_m, block_n, block_d, num_warps


def _dot_ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64) or (dtype == torch.bfloat16 and triton_interpreting())


def _splits(n_outer: int, block_outer: int, n_inner: int, block_inner: int):
    """Splits of the inner (swept) dimension and their width, so that the grid of
    (outer blocks × 2 directions × splits) reaches ~``_TARGET_PROGRAMS`` programs.

    One program per row block leaves a GPU mostly idle at the batch sizes of training: at
    B = 4096 with 32-row tiles that is 256 programs on 132 SMs, each sweeping 128 column tiles
    one after the other. Splitting the sweep (as flash-decoding splits the keys) multiplies the
    programs; each split keeps at least ``_MIN_TILES_PER_SPLIT`` tiles, and large batches that
    fill the GPU already keep one split (so no partial buffers: memory stays O(B·D)).
    """
    tiles = triton.cdiv(n_inner, block_inner)
    if _SPLIT_OVERRIDE is not None:
        splits = _SPLIT_OVERRIDE
    else:
        wanted = triton.cdiv(_TARGET_PROGRAMS, 2 * triton.cdiv(n_outer, block_outer))
        splits = min(wanted, tiles // _MIN_TILES_PER_SPLIT)
    splits = max(1, min(splits, tiles))
    width = triton.cdiv(tiles, splits) * block_inner
    return triton.cdiv(n_inner, width), width


def _acc_tl(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _row_block(block_d: int) -> int:
    """Rows per program of the O(B·D) passes (norms, gradient epilogue): ~2048 elements."""
    return max(1, 2048 // block_d)


def _triton_prep(image, text, logit_scale):
    """Inverse norms ``inv`` [2, N] (image rows, then text rows) and the check flags of
    ``_prep_kernel`` ([image blocks, text blocks, logit_scale]), in one launch."""
    n, dim = image.shape
    acc = _acc_dtype(image.dtype)
    _, _, block_d, num_warps = _launch_config(dim, image.dtype)
    block_m = _row_block(block_d)
    blocks = triton.cdiv(n, block_m)
    inv = torch.empty(2, n, dtype=acc, device=image.device)
    ok = torch.empty(2 * blocks + 1, dtype=torch.int32, device=image.device)
    _prep_kernel[(blocks, 2)](image, text, logit_scale, inv, ok, n, dim, dim, _NORM_EPS,
                              BLOCK_M=block_m, BLOCK_D=block_d, ACC=_acc_tl(acc), num_warps=num_warps)
    return inv, ok, blocks


# Rows per step of the one-program forward finish (8 warps): fp64 state is twice as wide, and
# 1024 rows spilled with ids (sm_90: 255 registers + 524 B of spill stores; 256 rows: none). At
# 4 warps the fp32 finish left an 8 B stack frame (triton 3.9); at 8, 64-96 registers, none.
_FINISH_BLOCK = {torch.float32: 1024, torch.float64: 256}


def _part_planes(has_ids: bool, smooth: bool) -> int:
    """Planes of ``_fwd_kernel``'s partial buffer: candidate max and mass; with ids the
    positives' max, mass, logit sum and count, else s_ii (split 0 only); the logit sum with
    label smoothing. Only what the call needs is reduced and stored."""
    return 2 + (4 if has_ids else 1) + (1 if smooth else 0)


def _triton_fwd(image, text, inv, ids, scale, seeds, row_start, n_local, keep, smooth, mode, ok):
    """Both directions: the sweep, then the merge of its splits and of the prep pass's check
    flags (two launches). Returns the loss, negatives [2, n_local], lse [2, n_local], pos_cnt
    [2, n_local] and the check flag [1] (int32, 1 = inputs ok)."""
    n, dim = image.shape
    acc = _acc_dtype(image.dtype)
    dev = image.device
    block_m, block_n, block_d, num_warps = _launch_config(dim, image.dtype)
    splits, width = _splits(n_local, block_m, n, block_n)
    has_ids, smoothing = ids is not None, smooth != 0.0
    part = torch.empty(_part_planes(has_ids, smoothing), splits, 2, n_local, dtype=acc, device=dev)
    part_idx = torch.empty(splits if mode else 1, 2, n_local, dtype=torch.int64, device=dev)
    inv_i, inv_t = inv.unbind(0)
    seed_arg = seeds if seeds is not None else part_idx  # unread unless MODE 1
    _fwd_kernel[(triton.cdiv(n_local, block_m), 2, splits)](
        image, text, inv_i, inv_t, ids if has_ids else part_idx, scale, seed_arg, part, part_idx,
        n_local, n, dim, row_start, dim, width,
        MODE=mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_IEEE=_dot_ieee(image.dtype), ACC=_acc_tl(acc), HAS_IDS=has_ids, SMOOTH=smoothing,
        num_warps=num_warps,
    )
    loss = torch.empty((), dtype=acc, device=dev)
    # separate buffers: views of one would alias each other (custom ops may not return that)
    lse = torch.empty(2, n_local, dtype=acc, device=dev)
    pos_cnt = torch.empty(2, n_local, dtype=acc, device=dev)
    neg = torch.empty(2, n_local, dtype=torch.int64, device=dev)
    flag = torch.empty(1, dtype=torch.int32, device=dev)
    # ½ (mean over image rows + mean over text rows)
    _fwd_finish_kernel[(1,)](part, part_idx, seed_arg, ok, ok.numel(), loss, lse, pos_cnt, neg,
                             flag, n_local, row_start, splits, keep, smooth, 0.5 / n_local,
                             MODE=mode, HAS_IDS=has_ids, SMOOTH=smoothing,
                             BLOCK=_FINISH_BLOCK[acc], ACC=_acc_tl(acc), num_warps=8)
    return loss, neg, lse, pos_cnt, flag


def _triton_bwd(grad_loss, image, text, inv, ids, scale, lse, pos_cnt, row_start, keep, smooth,
                normalize=True):
    """Gradients of (image, text) in their dtype and of logit_scale (fp32/fp64).

    One process (every row local): one row sweep per direction yields both whole gradients, and
    ``_bwd_finish_kernel`` sums its splits, applies the normalisation's backward and (program
    (0, 0)) sums the logit_scale gradient: two launches. Distributed: the column sweep adds the
    gradient of the gathered columns,
    and the pieces are combined here."""
    n, dim = image.shape
    n_local = lse.shape[1]
    acc = _acc_dtype(image.dtype)
    dev = image.device
    block_m, block_n, block_d, num_warps = _launch_config(dim, image.dtype)
    symmetric = n_local == n and row_start == 0
    row_splits, row_width = _splits(n_local, block_m, n, block_n)  # rows kernel: column splits
    dq = torch.empty(row_splits, 2, n_local, dim, dtype=acc, device=dev)
    dscale = torch.empty(row_splits, 2, n_local, dtype=acc, device=dev)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_IEEE=_dot_ieee(image.dtype),
                ACC=_acc_tl(acc), HAS_IDS=ids is not None, num_warps=num_warps)
    inv_i, inv_t = inv.unbind(0)
    # Every row loss enters with weight grad_loss · ½ · 1/n_local (two directions, mean over rows).
    common = (image, text, inv_i, inv_t, ids if ids is not None else lse, scale, grad_loss, lse,
              pos_cnt)
    sizes = (n_local, n, dim, row_start, dim, keep, smooth, 0.5 / n_local)
    _rows_bwd_kernel[(triton.cdiv(n_local, block_m), 2, row_splits)](
        *common, dq, dscale, *sizes, row_width, SYMMETRIC=symmetric, **meta)
    if symmetric and normalize:
        d_image, d_text = torch.empty_like(image), torch.empty_like(text)
        d_scale = torch.empty((), dtype=acc, device=dev)
        rows = _row_block(block_d)
        _bwd_finish_kernel[(triton.cdiv(n, rows), 2)](
            image, text, inv, dq, d_image, d_text, dscale, d_scale, n, dim, dim, row_splits,
            dscale.numel(), BLOCK_M=rows, BLOCK_D=block_d, ACC=_acc_tl(acc), BLOCK_S=1024,
            num_warps=num_warps)
        return d_image, d_text, d_scale
    d_scale = dscale.sum()
    if symmetric:
        # raw dot products (inv = 1): the row sweeps' sums are the feature gradients themselves
        d_feats = dq[0] if row_splits == 1 else dq.sum(0)
        # copies: two views of one buffer would alias each other (custom ops may not return that)
        return d_feats[0].to(image.dtype, copy=True), d_feats[1].to(text.dtype, copy=True), d_scale
    # the column sweep's dots have its columns as M: it takes the transposed tile (64 columns per
    # program, 32 rows per step at 16 bits), so they reach wgmma too
    cols_meta = dict(meta, BLOCK_M=block_n, BLOCK_N=block_m)
    col_splits, col_width = _splits(n, block_m, n_local, block_n)  # cols kernel: row splits
    dk = torch.empty(col_splits, 2, n, dim, dtype=acc, device=dev)
    _cols_bwd_kernel[(triton.cdiv(n, block_m), 2, col_splits)](*common, dk, *sizes, col_width,
                                                               **cols_meta)
    dk = dk[0] if col_splits == 1 else dk.sum(0)
    dq = dq[0] if row_splits == 1 else dq.sum(0)
    return (*_combine_distributed(image, text, inv, dq, dk, row_start, normalize), d_scale)
