"""The Triton kernels of the fused cross-entropy. :mod:`.launch` launches them and imports this
module only where triton is installed.

- ``reduction="none"``: ``_flce_forward_kernel`` (online log-sum-exp over one vocabulary split,
  the logits never written) and ``_flce_logit_grad_kernel`` (∂loss/∂z of one vocabulary chunk,
  the logits recomputed), with their helpers ``_logit_tile``, ``_target_logit`` and
  ``_grouped_tile`` (the launch order);
- ``"mean"``/``"sum"``: ``_flce_rows_kernel`` (lse, loss and dZ in place over the logits block a
  GEMM wrote) and ``_flce_dw_kahan_kernel`` (dW accumulated in 16 bits with compensation);
- ``_softcap`` and ``_round_to_bf16``, shared by both.

The FLOP and byte accounting of each path is in its launcher's docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softcap(z, cap):
    """c·tanh(z/c), written as c·(2·sigmoid(2z/c) - 1): tl.sigmoid exists in every supported
    triton (tanh is only in the per-backend libdevice) and saturates to ±c without overflow."""
    return cap * (2.0 * tl.sigmoid(z * (2.0 / cap)) - 1.0)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, dim, stride_h, stride_w,
                softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                UPCAST_DOT: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """fp32 logits of a [BLOCK_N rows, BLOCK_V vocabulary] tile: h[rows] · W[cols]ᵀ (+ b),
    soft-capped to c·tanh(z/c) when ``HAS_SOFTCAP``.

    The cap costs ~5 FLOPs and one exp per logit on top of the 2·D of the dot product, and no
    memory traffic (it is applied to the tile in registers).
    """
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE_INDEX:
        # rows·stride would overflow int32 (N·D or V·D >= 2^31, e.g. 1M tokens × 4096); the
        # 64-bit offsets cost registers (spills on sm_90), so only tensors this big pay them
        rows = rows.to(tl.int64)
        offs_v = offs_v.to(tl.int64)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_rows = w_ptr + offs_v[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d_mask = (d0 + offs_d) < dim
        h = tl.load(h_rows + (d0 + offs_d)[None, :], mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0)
        w = tl.load(w_rows + (d0 + offs_d)[None, :], mask=col_mask[:, None] & d_mask[None, :],
                    other=0.0)
        if UPCAST_DOT:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, softcap)
    return acc


@triton.jit
def _grouped_tile(pid, row_blocks, col_blocks, GROUP_M: tl.constexpr):
    """(row block, column block) of program ``pid`` in grouped order (the L2 swizzle of
    Triton's matmul tutorial): pids run over GROUP_M consecutive row blocks, then on to the
    next column block (a vocabulary split, or a tile of the backward's chunk), and only
    then to the next GROUP_M row blocks. So the programs in flight together cover a band of
    row blocks × many column blocks, and what they keep in L2 is that band's rows of H and
    the columns of W it is on, bounded whatever N and D. GROUP_M >= row_blocks is the order
    the kernels had before (every row block of column 0 first), which shares each W tile
    among all programs in flight but holds all their rows of H (see ``triton_forward``)."""
    in_group = GROUP_M * col_blocks
    first_row = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - first_row, GROUP_M)
    pid_n = first_row + (pid % in_group) % group_rows
    pid_c = (pid % in_group) // group_rows
    return pid_n, pid_c


@triton.jit
def _target_logit(h_ptr, w_ptr, b_ptr, rows, tgt, row_mask, dim, stride_h, stride_w, softcap,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """z_t = h_n·W[t_n] (+ b[t_n]), capped like the tile, for BLOCK_N rows: one gathered
    load of each row's target column of W (2·D FLOPs and 2·D elements read per row), so the
    vocabulary loop needs no masked pick of the target out of every tile."""
    offs_d = tl.arange(0, BLOCK_D)
    if WIDE_INDEX:
        rows = rows.to(tl.int64)
        tgt = tgt.to(tl.int64)
    h_rows = h_ptr + rows[:, None] * stride_h
    w_rows = w_ptr + tgt[:, None] * stride_w
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        mask = row_mask[:, None] & ((d0 + offs_d) < dim)[None, :]
        h = tl.load(h_rows + (d0 + offs_d)[None, :], mask=mask, other=0.0)
        w = tl.load(w_rows + (d0 + offs_d)[None, :], mask=mask, other=0.0)
        acc += h.to(tl.float32) * w.to(tl.float32)
    zt = tl.sum(acc, axis=1)
    if HAS_BIAS:
        zt += tl.load(b_ptr + tgt, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        zt = _softcap(zt, softcap)
    return zt


@triton.jit
def _flce_forward_kernel(
    h_ptr, w_ptr, b_ptr, target_ptr, order_ptr, n_valid_ptr,
    part_lse_ptr, part_best_ptr, part_arg_ptr, zt_ptr, part_zsum_ptr,
    n_rows, vocab, dim, vocab_per_split, splits,
    stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    STATS: tl.constexpr = True, GROUP_M: tl.constexpr = 1,
):
    """One program: BLOCK_N rows × one vocabulary split, online log-sum-exp over its tiles;
    a 1-D grid of (row blocks × splits) programs in grouped order (``_grouped_tile``).

    Rows come through ``order`` (valid rows first) and programs past ``n_valid`` exit at once,
    so ignored rows cost nothing and no host sync is needed to count them. Row reductions per
    tile: two, the max and Σexp of the online lse (+ Σz only with label smoothing, + the
    argmax's min-index only with ``STATS``: both constexpr gates). The target logit is one
    gathered dot product per row outside the vocabulary loop, by the split-0 programs.
    """
    pid_n, pid_s = _grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N), splits, GROUP_M)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N >= n_valid:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_valid
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0)
    v_begin = pid_s * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    if pid_s == 0:
        tgt = tl.load(target_ptr + rows, mask=row_mask, other=0)
        zt = _target_logit(h_ptr, w_ptr, b_ptr, rows, tgt, row_mask, dim, stride_h, stride_w,
                           softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_D, WIDE_INDEX)
        tl.store(zt_ptr + offs_n, zt, mask=row_mask)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < v_end
        acc = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, dim,
                          stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V,
                          BLOCK_D, DOT_PRECISION, UPCAST_DOT, WIDE_INDEX)
        if SMOOTHING:
            zsum += tl.sum(tl.where(col_mask[None, :], acc, 0.0), axis=1)
        acc = tl.where(col_mask[None, :], acc, float("-inf"))
        tile_max = tl.max(acc, axis=1)
        if STATS:
            # first index of the tile maximum, as torch.argmax
            tile_arg = tl.min(tl.where(acc == tile_max[:, None], offs_v[None, :], 2147483647),
                              axis=1)
            better = tile_max > best
            best = tl.where(better, tile_max, best)
            best_idx = tl.where(better, tile_arg, best_idx)
        m_new = tl.maximum(m, tile_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(acc - m_new[:, None]), axis=1)
        m = m_new
    out = pid_s * n_rows + offs_n
    tl.store(part_lse_ptr + out, m + tl.log(s), mask=row_mask)
    if STATS:
        tl.store(part_best_ptr + out, best, mask=row_mask)
        tl.store(part_arg_ptr + out, best_idx, mask=row_mask)
    if SMOOTHING:
        tl.store(part_zsum_ptr + out, zsum, mask=row_mask)


@triton.jit
def _flce_logit_grad_kernel(
    h_ptr, w_ptr, b_ptr, target_ptr, order_ptr, n_valid_ptr, lse_ptr, grad_ptr, dz_ptr,
    n_rows, vocab, dim, v_start, chunk,
    stride_h, stride_w, stride_dz,
    label_smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    GROUP_M: tl.constexpr = 1, RN_BF16: tl.constexpr = False,
):
    """∂loss/∂z for the valid rows × one vocabulary chunk, recomputing the logits tile by tile;
    a 1-D grid of (row blocks × column tiles) programs in grouped order (``_grouped_tile``).

    The logits themselves never reach memory; only this chunk's gradient does, stored at each
    row's own index, so the launcher applies it with two dense matmuls on the original rows
    (dH += dZ·W_c, dW_c = dZᵀ·H) without copying H into compacted order. Ignored rows are
    never written: the launcher zeroes dZ once and they stay zero for every chunk. No row
    reduction at all: lse comes from the forward, the target is an elementwise compare.
    """
    pid_n, pid_v = _grouped_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N),
                                 tl.cdiv(chunk, BLOCK_V), GROUP_M)
    n_valid = tl.load(n_valid_ptr)
    if pid_n * BLOCK_N >= n_valid:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)  # column inside the chunk
    offs_v = v_start + offs_c
    row_mask = offs_n < n_valid
    col_mask = (offs_c < chunk) & (offs_v < vocab)
    rows = tl.load(order_ptr + offs_n, mask=row_mask, other=0)
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    acc = _logit_tile(h_ptr, w_ptr, b_ptr, rows, row_mask, offs_v, col_mask, dim,
                      stride_h, stride_w, softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V,
                      BLOCK_D, DOT_PRECISION, UPCAST_DOT, WIDE_INDEX)
    # the row factors first, with g folded in: one multiply-add per logit after its exp
    # (and the compare for the target) instead of a multiply by g on top
    row_scale = g * (1.0 + 2.0 * z_loss * lse)
    row_shift = g * (label_smoothing / vocab)
    row_target = g * (1.0 - label_smoothing)
    dz = tl.exp(acc - lse[:, None]) * row_scale[:, None] - row_shift[:, None]
    dz = tl.where(offs_v[None, :] == tgt[:, None], dz - row_target[:, None], dz)
    if HAS_SOFTCAP:
        # chain rule through the cap, from the capped tile: ∂z'/∂z = 1 - (z'/c)² (3 FLOPs)
        capped = acc / softcap
        dz = dz * (1.0 - capped * capped)
    dz = _round_to_bf16(tl.where(col_mask[None, :], dz, 0.0), RN_BF16)  # (the interpreter's)
    if WIDE_INDEX:
        rows = rows.to(tl.int64)
    # dZ is the launcher's own buffer, its row stride a multiple of BLOCK_V (>= 16) and every
    # tile inside it (columns past ``chunk`` are padding, written as zeros, never read): so
    # the row-gathered pointers are 16-byte aligned and the mask is constant along a row,
    # which lets the store be vectorised. Without that its [BLOCK_N, BLOCK_V] per-element
    # pointers spilled 380 bytes at 128-row tiles on sm_90.
    row_offsets = tl.multiple_of(rows * stride_dz, 16)
    dz_rows = tl.multiple_of(dz_ptr + row_offsets, 16)
    tl.store(dz_rows[:, None] + offs_c[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None])


@triton.jit
def _round_to_bf16(x, EMULATE: tl.constexpr):
    """fp32 x rounded to the nearest bf16 value (ties to even), still as fp32.

    GPUs convert with round-to-nearest (cvt.rn); Triton's CPU interpreter truncates when it
    casts fp32 to bf16, which doubles the error of every stored value and biases it (a
    sum of many then drifts). Under the interpreter (``EMULATE``) the rounding is done on
    the bits first, so the cast that follows is exact; elsewhere this is the identity.
    """
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _flce_rows_kernel(
    z_ptr, dz_ptr, target_ptr, scale_ptr, loss_ptr, lse_ptr, arg_ptr,
    n_rows, vocab, width, stride_z, stride_dz, label_smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, SMOOTHING: tl.constexpr, STATS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, NARROW: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr, RN_BF16: tl.constexpr,
):
    """BLOCK_R rows of a [R, V] logits block (written by a GEMM) per program: their lse and
    loss, and ∂loss/∂z·scale written over the logits in place (``WRITE_GRAD``), which the GEMMs
    for dH and dW then read.

    Two passes over each row: the first keeps a running max and Σexp (one max and one sum
    reduction per tile; Σz and the argmax, when asked, accumulate per lane and reduce once at
    the end), the second writes dZ. The target logit is one load per row, not a reduction.
    FLOPs per logit: ~6 (+5 with softcap); bytes per logit: 2 reads + 1 write of the block's
    dtype. A row with ``scale`` = 0 (an ignored row in the block) gets dZ = 0. GPUs run one
    row per program (BLOCK_R = 1: a row is 100 KB at V = 50257); the interpreter, whose cost
    is per program and per op, takes many.

    ``width`` (>= vocab: the padded row of the launcher's buffer, a multiple of 64 elements)
    bounds the loads and stores, ``vocab`` the arithmetic: with V = 50257 a mask at V made
    every access a scalar 2-byte one (the JIT could not prove a mask constant over a vector);
    at the padded width the sm_90 build moves 16 bytes per access. Columns in [V, width) are
    read as whatever they hold and get dZ = 0 (the GEMMs take the first V columns anyway).

    ``dz_ptr`` is the same memory as ``z_ptr``: the logits themselves (16-bit or fp32 blocks
    of 16/32-bit inputs) or, with ``NARROW``, fp32 logits of 16-bit inputs whose 16-bit
    gradient is written over the first half of each row's bytes (``stride_dz`` = 2·stride_z
    16-bit elements). Tile i's stores then land on logits of tiles <= i, which this row's
    program has loaded already: a barrier after each tile's loads makes sure every warp
    has, before any warp stores.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    dz_rows = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=0)
    g = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    offs = tl.arange(0, BLOCK_V)
    z_t = tl.load(z_rows + tgt[:, None], mask=row_mask[:, None], other=0.0).to(tl.float32)
    z_t = tl.sum(z_t, axis=1)  # [BLOCK_R, 1] -> [BLOCK_R]
    if HAS_SOFTCAP:
        # tanh(x) = 2·sigmoid(2x) - 1 (as _logit_tile)
        z_t = _softcap(z_t, softcap)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_R,), tl.float32)
    z_sum = tl.zeros((BLOCK_R, BLOCK_V), tl.float32)
    best = tl.full((BLOCK_R, BLOCK_V), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_R, BLOCK_V), tl.int32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + offs
        mask = row_mask[:, None] & (cols < vocab)[None, :]
        in_row = row_mask[:, None] & (cols < width)[None, :]
        z = tl.load(z_rows + cols[None, :], mask=in_row, other=0.0).to(tl.float32)
        z = tl.where(mask, z, 0.0)  # the padding holds anything: out of the arithmetic
        if HAS_SOFTCAP:
            z = _softcap(z, softcap)
        if SMOOTHING:
            z_sum += tl.where(mask, z, 0.0)
        z = tl.where(mask, z, float("-inf"))
        if STATS:
            better = z > best  # strict: each lane keeps its first maximum
            best = tl.where(better, z, best)
            best_idx = tl.where(better, cols[None, :], best_idx)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_new = tl.where(row_mask, m_new, 0.0)  # rows past the block: no inf - inf
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    lse = m + tl.log(tl.where(row_mask, s, 1.0))
    loss = lse - (1.0 - label_smoothing) * z_t
    if SMOOTHING:
        loss -= (label_smoothing / vocab) * tl.sum(z_sum, axis=1)
    loss += z_loss * lse * lse
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if STATS:
        top = tl.max(best, axis=1)
        # the first index of the row maximum, as torch.argmax
        arg = tl.min(tl.where(best == top[:, None], best_idx, 2147483647), axis=1)
        tl.store(arg_ptr + rows, arg, mask=row_mask)
    if WRITE_GRAD:
        coef = (g * (1.0 + 2.0 * z_loss * lse))[:, None]
        off_target = (g * (label_smoothing / vocab))[:, None]
        on_target = (g * (1.0 - label_smoothing))[:, None]
        for v0 in range(0, vocab, BLOCK_V):
            cols = v0 + offs
            in_row = row_mask[:, None] & (cols < width)[None, :]
            in_vocab = (cols < vocab)[None, :]
            z = tl.load(z_rows + cols[None, :], mask=in_row, other=0.0).to(tl.float32)
            z = tl.where(in_vocab, z, 0.0)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            dz = (coef * tl.exp(z - lse[:, None]) - off_target
                  - tl.where(cols[None, :] == tgt[:, None], on_target, 0.0))
            if HAS_SOFTCAP:
                capped = z / softcap
                dz = dz * (1.0 - capped * capped)
            dz = tl.where(in_vocab, dz, 0.0)
            dz = _round_to_bf16(dz, RN_BF16)
            if NARROW:
                tl.debug_barrier()
            tl.store(dz_rows + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=in_row)


@triton.jit
def _flce_dw_kahan_kernel(
    dz_ptr, h_ptr, sum_ptr, comp_ptr,
    k_rows, vocab, dim, stride_dz, stride_h, stride_w,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST_DOT: tl.constexpr, WIDE_INDEX: tl.constexpr, RN_SUM: tl.constexpr,
    RN_COMP: tl.constexpr,
):
    """dW += dZᵀ·H for one row block, added to a 16-bit dW with compensated (Kahan)
    summation: ``sum`` (the gradient itself, fp16/bf16) and ``comp`` (bf16: the rounding
    error the stored sum carries, so that sum - comp is the fp32-exact running total).

    One program: a [BLOCK_V, BLOCK_D] tile of dW over the block's k_rows (the GEMM's K).
    Per tile: 2·BLOCK_V·BLOCK_D·k_rows FLOPs; reads of dZ (BLOCK_V·k_rows) and H
    (k_rows·BLOCK_D), and 4 reads + 4 writes of 16-bit sum/comp per element: 8 bytes per dW
    element per row block, against 4 for a plain 16-bit accumulator (whose error grows with
    the number of blocks: 4.9× PyTorch's at the target shape). The D tiles of one V tile are
    neighbours in the launch order (axis 0), so they read the same dZ columns from L2.
    """
    pid_d = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    v_mask = offs_v < vocab
    d_mask = offs_d < dim
    if WIDE_INDEX:
        offs_v = offs_v.to(tl.int64)
    acc = tl.zeros((BLOCK_V, BLOCK_D), tl.float32)
    for k0 in range(0, k_rows, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_rows
        # dZᵀ tile [BLOCK_V, BLOCK_K]: consecutive v are contiguous in dZ's rows
        dz_t = tl.load(dz_ptr + k[None, :] * stride_dz + offs_v[:, None],
                       mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        h = tl.load(h_ptr + k[:, None] * stride_h + offs_d[None, :],
                    mask=k_mask[:, None] & d_mask[None, :], other=0.0)
        if UPCAST_DOT:
            dz_t, h = dz_t.to(tl.float32), h.to(tl.float32)
        acc = tl.dot(dz_t, h, acc)
    mask = v_mask[:, None] & d_mask[None, :]
    offs = offs_v[:, None] * stride_w + offs_d[None, :]
    total = tl.load(sum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    comp = tl.load(comp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = acc - comp
    # RN_SUM / RN_COMP: a bf16 sum / the compensation under the interpreter (see
    # _round_to_bf16; an fp16 sum is rounded to nearest there already)
    new = _round_to_bf16(total + y, RN_SUM).to(sum_ptr.dtype.element_ty)
    # what rounding ``total + y`` to 16 bits lost (exact in fp32: both are near ``total``)
    comp = (new.to(tl.float32) - total) - y
    tl.store(sum_ptr + offs, new, mask=mask)
    comp = _round_to_bf16(comp, RN_COMP)
    tl.store(comp_ptr + offs, comp.to(comp_ptr.dtype.element_ty), mask=mask)
