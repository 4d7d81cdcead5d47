"""The Triton kernels of the fused contrastive loss. :mod:`.launch` launches them and imports this
module only where triton is installed.

- ``_prep_kernel``: inverse norms of both feature sets and the input check, one pass;
- ``_fwd_kernel``: the forward sweep of both directions (online log-sum-exp of the candidates and
  the positives, mining by weighted reservoir sampling or argmax), over one split of the columns;
  ``_fwd_finish_kernel`` merges the splits, reduces the loss and the check flags;
- ``_rows_bwd_kernel`` (and, distributed, ``_cols_bwd_kernel``): the backward sweeps, recomputing
  the similarity tiles from the saved log-sum-exp; ``_bwd_finish_kernel`` sums the splits and
  takes the gradient through the normalisation;
- the helpers ``_mma``, ``_similarity_tile``, ``_direction``, ``_pair_ids``, ``_uniforms``,
  ``_inverse_norm`` and ``_grad_logits``.

The accounting (FLOPs, bytes, launches) is in the package docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mma(a, b, DOT_IEEE: tl.constexpr, ACC: tl.constexpr):
    """a @ b with ACC accumulation. DOT_IEEE is set for fp32/fp64 inputs (full-precision
    products: TF32 would cost ~1e-3 relative error in a cosine, i.e. up to 0.1 in a logit at
    scale 100) and for bf16 under the interpreter, whose bf16 tl.dot is wrong (triton 3.9): the
    launcher then upcasts there only; on a GPU bf16/fp16 tiles go to the tensor cores as is."""
    if DOT_IEEE:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, out_dtype=ACC)


@triton.jit
def _similarity_tile(q, k_ptr, inv_k_ptr, cols, col_mask, inv_q, scale, stride, dim,
                     BLOCK_D: tl.constexpr, DOT_IEEE: tl.constexpr, ACC: tl.constexpr):
    """Loads one column block of K and returns (s, cos, k, inv_k): the scaled similarity tile
    [BLOCK_M, BLOCK_N], the cosine tile, the raw K block [BLOCK_N, BLOCK_D] and its inverse
    norms.

    Normalisation is fused: the dot product runs on the raw features (tensor cores in the input
    dtype, ACC accumulation) and is multiplied by both inverse norms afterwards, which never
    rounds a normalised copy back to bf16.
    """
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + cols[:, None] * stride + offs_d[None, :],
                mask=col_mask[:, None] & (offs_d[None, :] < dim), other=0.0)
    inv_k = tl.load(inv_k_ptr + cols, mask=col_mask, other=0.0)
    dots = _mma(q, tl.trans(k), DOT_IEEE, ACC)
    cos = dots * inv_q[:, None] * inv_k[None, :]
    return cos * scale, cos, k, inv_k


@triton.jit
def _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d):
    """Direction d = 0: image rows against text columns; d = 1: text rows against image
    columns. Both directions run in the same launch (program_id(1)), which doubles the grid
    for small batches and halves the launches."""
    if d == 0:
        q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr
    else:
        q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = txt_ptr, img_ptr, inv_txt_ptr, inv_img_ptr
    return q_ptr, k_ptr, inv_q_ptr, inv_k_ptr


@triton.jit
def _pair_ids(ids_ptr, idx, mask, HAS_IDS: tl.constexpr):
    """The ids of rows/columns ``idx`` of the gathered batch: loaded when the caller gave
    ``ids``, else the index itself (pair i is the only positive of i), with no ids buffer."""
    if HAS_IDS:
        ids = tl.load(ids_ptr + idx, mask=mask, other=0)
    else:
        ids = idx.to(tl.int64)
    return ids


@triton.jit
def _uniforms(seed, c0, c1, c2, c3):
    """Two uniforms in the open interval (0, 1) per element of the uint32 counters: words 0
    and 1 of Philox(seed, (c0, c1, c2, c3)), 24 bits each, centred ((k + ½) / 2^24), so a
    draw is never exactly 0 or 1 (see the reservoir step in ``_fwd_kernel``). A counter-based
    source: the draws depend on the counters only, not on the launch order."""
    w0, w1, _, _ = tl.philox(seed, c0, c1, c2, c3)
    u0 = ((w0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    u1 = ((w1 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return u0, u1


@triton.jit
def _inverse_norm(sq, eps, ACC: tl.constexpr):
    """1 / max(sqrt(sq), eps), rounded as torch rounds it (IEEE square root and division)."""
    if ACC == tl.float64:
        inv = 1.0 / tl.maximum(tl.sqrt(sq), eps)  # fp64 sqrt and division are IEEE
    else:
        inv = tl.div_rn(tl.full(sq.shape, 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), eps))
    return inv


@triton.jit
def _prep_kernel(img_ptr, txt_ptr, scale_ptr, inv_ptr, ok_ptr, n, dim, stride, eps,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Inverse norms of both feature sets, ``inv[d, i] = 1 / max(||x_i||, eps)`` (as
    F.normalize), and the input check in the same pass: ``ok[d · programs + pid]`` is 1 when
    the rows of this block are finite, and the last entry when logit_scale is positive and
    finite. A squared norm is finite exactly when its row is (nan and ±inf propagate; a
    finite row whose squared norm overflows the accumulator fails too, rightly: its
    normalised copy would be garbage), so the check costs no extra pass over the features.
    Grid: (row blocks, 2 feature sets)."""
    pid = tl.program_id(0)
    d = tl.program_id(1)
    x_ptr = img_ptr
    if d == 1:
        x_ptr = txt_ptr
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + rows[:, None] * stride + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d[None, :] < dim), other=0.0).to(ACC)
    sq = tl.sum(x * x, 1)
    tl.store(inv_ptr + d * n + rows, _inverse_norm(sq, eps, ACC), mask=row_mask)
    finite = (sq < float("inf")) | (~row_mask)  # nan < inf is False
    tl.store(ok_ptr + d * tl.num_programs(0) + pid, tl.min(finite.to(tl.int32), 0))
    if pid == 0 and d == 0:
        s = tl.load(scale_ptr).to(ACC)
        tl.store(ok_ptr + 2 * tl.num_programs(0), ((s > 0) & (s < float("inf"))).to(tl.int32))


@triton.jit
def _fwd_kernel(
    img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, ids_ptr, scale_ptr, seed_ptr,
    part_ptr, part_idx_ptr,
    n_q, n_k, dim, row_start, stride, cols_per_split,
    MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, ACC: tl.constexpr, HAS_IDS: tl.constexpr, SMOOTH: tl.constexpr,
):
    """One program = BLOCK_M local query rows of one direction swept against one split of the
    columns (grid: row blocks, direction, column splits).

    Per row it keeps the online log-sum-exp of the *candidates* (the non-positive columns:
    running max m_c, running mass l_c = Σ exp(s - m_c)), which is at once the denominator's
    bulk and the mass the sampler needs, and, only where the call needs them:

    - HAS_IDS: the positives' own log-sum-exp (m_p, l_p), their logit sum and count (one
      exp per logit serves both sets: the shift is picked per element). Without ids the
      row's only positive is its pair: its logit s_ii comes from one O(D) indexed dot per
      row (split 0 only) and the finish kernel adds it to the log-sum-exp.
    - SMOOTH (label smoothing): the sum of all logits.
    - MODE 1 (sample): exact weighted reservoir sampling per (row, tile). With the tile's
      candidate weights w_j = exp(s_j - m_c) and mass m_t = Σ w_j, the candidate switches to
      this tile with probability m_t / (l_c + m_t) (uniform u₀), and inside it column j is
      taken by inverse CDF, the first j with cumsum(w)_j ≥ u₁·m_t (uniform u₁; both in (0, 1)
      so a zero-weight column is never taken). By induction P(column j) = w_j / Σ_all w: the
      law of softmax(s) over the candidates, drawn with two uniforms per (row, tile) — one
      Philox call per row and tile, counter (column tile, global row, 0, direction) — and no
      per-logit random number or log. MODE 2 (hardest): the running argmax comes with the
      tile max (one reduction). A row without any candidate keeps index -1.

    Partial statistics go to ``part`` [planes, splits, 2, n_q] (see ``_part_planes``) and the
    candidate index to ``part_idx`` [splits, 2, n_q]; ``_fwd_finish_kernel`` merges the
    splits (by the same reservoir rule).
    """
    pid = tl.program_id(0)
    d = tl.program_id(1)
    split = tl.program_id(2)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_k)
    q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    grows = row_start + rows  # rows of the gathered batch
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + grows[:, None] * stride + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d[None, :] < dim), other=0.0)
    inv_q = tl.load(inv_q_ptr + grows, mask=row_mask, other=0.0)
    ids_q = _pair_ids(ids_ptr, grows, row_mask, HAS_IDS)
    scale = tl.load(scale_ptr).to(ACC)
    if MODE == 1:
        seed = tl.load(seed_ptr)
        rng_row = grows.to(tl.uint32)
        rng_dir = (0 * rows + d).to(tl.uint32)
        rng_zero = 0 * rng_row

    m_c = tl.full((BLOCK_M,), float("-inf"), ACC)
    l_c = tl.zeros((BLOCK_M,), ACC)
    if HAS_IDS:
        m_p = tl.full((BLOCK_M,), float("-inf"), ACC)
        l_p = tl.zeros((BLOCK_M,), ACC)
        pos_sum = tl.zeros((BLOCK_M,), ACC)
        pos_cnt = tl.zeros((BLOCK_M,), ACC)
    if SMOOTH:
        row_sum = tl.zeros((BLOCK_M,), ACC)
    best_idx = tl.full((BLOCK_M,), -1, tl.int64)

    if not HAS_IDS:
        if split == 0:
            # s_ii by an indexed dot: O(D) per row instead of a masked reduction per tile.
            # Chunks of 32 features reloaded (from L2) rather than the register-resident q:
            # a whole [BLOCK_M, D] fp32 product cost ~40 registers/thread at D = 256.
            dot = tl.zeros((BLOCK_M,), ACC)
            for c in range(0, dim, 32):
                offs_c = c + tl.arange(0, 32)
                m_c2 = row_mask[:, None] & (offs_c[None, :] < dim)
                q_c = tl.load(q_ptr + grows[:, None] * stride + offs_c[None, :], mask=m_c2, other=0.0)
                k_c = tl.load(k_ptr + grows[:, None] * stride + offs_c[None, :], mask=m_c2, other=0.0)
                dot += tl.sum(q_c.to(ACC) * k_c.to(ACC), 1)
            inv_k_ii = tl.load(inv_k_ptr + grows, mask=row_mask, other=0.0)
            tl.store(part_ptr + 2 * tl.num_programs(2) * 2 * n_q + (2 * split + d) * n_q + rows,
                     dot * inv_q * inv_k_ii * scale, mask=row_mask)

    for start in range(col_begin, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < col_end
        s, cos, k, inv_k = _similarity_tile(q, k_ptr, inv_k_ptr, cols, col_mask, inv_q, scale,
                                            stride, dim, BLOCK_D, DOT_IEEE, ACC)
        if HAS_IDS:
            ids_k = _pair_ids(ids_ptr, cols, col_mask, HAS_IDS)
            pos = (ids_q[:, None] == ids_k[None, :]) & col_mask[None, :]
        else:
            pos = grows[:, None] == cols[None, :]  # the pair itself
        cand = col_mask[None, :] & (~pos)
        s_c = tl.where(cand, s, float("-inf"))
        if MODE == 2:
            tile_max, tile_arg = tl.max(s_c, 1, return_indices=True,
                                        return_indices_tie_break_left=True)
            # strict '>': ties keep the earlier column, a tile without candidates never wins
            best_idx = tl.where(tile_max > m_c, tile_arg.to(tl.int64) + start, best_idx)
        else:
            tile_max = tl.max(s_c, 1)
        m_new = tl.maximum(m_c, tile_max)
        # a row may have seen no candidate yet (-inf): shift by 0 then (exp(-inf) = 0, no nan)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_c - shift)
        if HAS_IDS:
            mp_new = tl.maximum(m_p, tl.max(tl.where(pos, s, float("-inf")), 1))
            p_shift = tl.where(mp_new == float("-inf"), 0.0, mp_new)
            e = tl.exp(s - tl.where(pos, p_shift[:, None], shift[:, None]))
            l_p = l_p * tl.exp(m_p - p_shift) + tl.sum(tl.where(pos, e, 0.0), 1)
            m_p = mp_new
            pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
            pos_cnt += tl.sum(pos.to(ACC), 1)
        else:
            e = tl.exp(s - shift[:, None])
        w = tl.where(cand, e, 0.0)
        if MODE == 1:
            cum = tl.cumsum(w, 1)
            mass = tl.max(cum, 1)  # = the last entry (w ≥ 0): the same number the pick uses
            u_switch, u_pick = _uniforms(seed, rng_zero + start // BLOCK_N, rng_row, rng_zero,
                                         rng_dir)
            total = l_c * alpha + mass
            switch = u_switch.to(ACC) * total < mass
            pick = tl.sum((cum < (u_pick.to(ACC) * mass)[:, None]).to(tl.int32), 1)
            best_idx = tl.where(switch, pick.to(tl.int64) + start, best_idx)
            l_c = total
        else:
            l_c = l_c * alpha + tl.sum(w, 1)
        m_c = m_new
        if SMOOTH:
            row_sum += tl.sum(tl.where(col_mask[None, :], s, 0.0), 1)

    out = (split * 2 + d) * n_q + rows
    plane = tl.num_programs(2) * 2 * n_q
    tl.store(part_ptr + out, m_c, mask=row_mask)
    tl.store(part_ptr + plane + out, l_c, mask=row_mask)
    if HAS_IDS:
        tl.store(part_ptr + 2 * plane + out, m_p, mask=row_mask)
        tl.store(part_ptr + 3 * plane + out, l_p, mask=row_mask)
        tl.store(part_ptr + 4 * plane + out, pos_sum, mask=row_mask)
        tl.store(part_ptr + 5 * plane + out, pos_cnt, mask=row_mask)
    if SMOOTH:
        tl.store(part_ptr + (6 if HAS_IDS else 3) * plane + out, row_sum, mask=row_mask)
    if MODE != 0:
        tl.store(part_idx_ptr + out, best_idx, mask=row_mask)


@triton.jit
def _grad_logits(s, lse, pos, pos_cnt, valid, weight, keep, smooth):
    """dL/ds for one tile of one direction's loss: weight · (softmax(s) - target), target =
    keep·[pos]/|P| + smooth (keep = 1-ε, smooth = ε/N). ``lse`` and ``pos_cnt`` are that
    direction's row statistics, broadcast along the tile ([M, 1] when its rows are the tile's
    rows, [1, N] when they are its columns); entries outside ``valid`` give 0."""
    p = tl.exp(s - lse)
    target = tl.where(pos, keep / pos_cnt, 0.0) + smooth
    return tl.where(valid, weight * (p - target), 0.0)


@triton.jit
def _rows_bwd_kernel(
    img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, ids_ptr, scale_ptr, grad_ptr,
    lse_ptr, pos_cnt_ptr, dq_ptr, dscale_ptr,
    n_q, n_k, dim, row_start, stride, keep, smooth, weight_scale, cols_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, ACC: tl.constexpr, HAS_IDS: tl.constexpr, SYMMETRIC: tl.constexpr,
):
    """Gradient w.r.t. the normalised local query rows of direction d, dq̂_i = scale Σ_j G_ij k̂_j,
    and the per-row part of dL/dscale = Σ_j G_ij cos_ij, over one split of the columns. One
    program owns BLOCK_M rows of one split, so its [BLOCK_M, D] accumulator needs no atomics:
    it writes dq [splits, 2, n_q, D] and ``_bwd_finish_kernel`` sums the splits. The tile is recomputed
    from the saved lse.

    SYMMETRIC (one process: every row is local, n_q = n_k): the tile's columns are the other
    direction's rows, and s_ij is the same logit in both losses, so G gets the other loss's
    term too, from the other direction's saved statistics at the columns. This sweep then
    yields the whole gradient of each feature set and the column kernel is not run: the
    backward costs two tile matmuls per (i, j) and direction instead of four.
    """
    pid = tl.program_id(0)
    d = tl.program_id(1)
    split = tl.program_id(2)
    col_begin = split * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, n_k)
    q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_q
    grows = row_start + rows
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + grows[:, None] * stride + offs_d[None, :],
                mask=row_mask[:, None] & (offs_d[None, :] < dim), other=0.0)
    inv_q = tl.load(inv_q_ptr + grows, mask=row_mask, other=0.0)
    ids_q = _pair_ids(ids_ptr, grows, row_mask, HAS_IDS)
    lse = tl.load(lse_ptr + d * n_q + rows, mask=row_mask, other=0.0)
    pos_cnt = tl.load(pos_cnt_ptr + d * n_q + rows, mask=row_mask, other=1.0)
    scale = tl.load(scale_ptr).to(ACC)
    weight = tl.load(grad_ptr).to(ACC) * weight_scale
    acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    dscale = tl.zeros((BLOCK_M,), ACC)
    for start in range(col_begin, col_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < col_end
        s, cos, k, inv_k = _similarity_tile(q, k_ptr, inv_k_ptr, cols, col_mask, inv_q, scale,
                                            stride, dim, BLOCK_D, DOT_IEEE, ACC)
        ids_k = _pair_ids(ids_ptr, cols, col_mask, HAS_IDS)
        pos = ids_q[:, None] == ids_k[None, :]
        valid = row_mask[:, None] & col_mask[None, :]
        g = _grad_logits(s, lse[:, None], pos, pos_cnt[:, None], valid, weight, keep, smooth)
        dscale += tl.sum(g * cos, 1)  # this direction's loss only: each is counted once
        if SYMMETRIC:
            other = (1 - d) * n_q + cols
            lse_k = tl.load(lse_ptr + other, mask=col_mask, other=0.0)
            cnt_k = tl.load(pos_cnt_ptr + other, mask=col_mask, other=1.0)
            g += _grad_logits(s, lse_k[None, :], pos, cnt_k[None, :], valid, weight, keep, smooth)
        # k̂ = k · inv_k: fold the column norm into G before the matmul (G is cast to the input
        # dtype for the tensor cores, as flash-attention does with P).
        gk = (g * inv_k[None, :]).to(k.dtype)
        acc += _mma(gk, k, DOT_IEEE, ACC)
    out = (split * 2 + d) * n_q + rows
    tl.store(dq_ptr + out[:, None] * dim + offs_d[None, :], acc * scale,
             mask=row_mask[:, None] & (offs_d[None, :] < dim))
    tl.store(dscale_ptr + out, dscale, mask=row_mask)


@triton.jit
def _cols_bwd_kernel(
    img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, ids_ptr, scale_ptr, grad_ptr,
    lse_ptr, pos_cnt_ptr, dk_ptr,
    n_q, n_k, dim, row_start, stride, keep, smooth, weight_scale, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr, ACC: tl.constexpr, HAS_IDS: tl.constexpr,
):
    """Gradient w.r.t. the normalised key columns of direction d, dk̂_j = scale Σ_i G_ij q̂_i.
    One program owns BLOCK_N columns and sweeps every local query row block (deterministic, no
    atomics). It works on the transposed tile G^T [BLOCK_N, BLOCK_M] computed as K·Q^T, with Q
    loaded in both layouts, so no register tile is ever transposed (with fp32 inputs,
    transposing G made the sm_90 build spill its whole state to local memory). With several
    splits of the query rows, each writes its part of dk [splits, 2, n_k, D]; the launcher
    sums them."""
    pid = tl.program_id(0)
    d = tl.program_id(1)
    split = tl.program_id(2)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, n_q)
    q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_k
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < dim
    k = tl.load(k_ptr + cols[:, None] * stride + offs_d[None, :],
                mask=col_mask[:, None] & d_mask[None, :], other=0.0)
    inv_k = tl.load(inv_k_ptr + cols, mask=col_mask, other=0.0)
    ids_k = _pair_ids(ids_ptr, cols, col_mask, HAS_IDS)
    scale = tl.load(scale_ptr).to(ACC)
    weight = tl.load(grad_ptr).to(ACC) * weight_scale
    acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        grows = row_start + rows
        q_t = tl.load(q_ptr + grows[None, :] * stride + offs_d[:, None],
                      mask=row_mask[None, :] & d_mask[:, None], other=0.0)
        inv_q = tl.load(inv_q_ptr + grows, mask=row_mask, other=0.0)
        ids_q = _pair_ids(ids_ptr, grows, row_mask, HAS_IDS)
        lse = tl.load(lse_ptr + d * n_q + rows, mask=row_mask, other=0.0)
        pos_cnt = tl.load(pos_cnt_ptr + d * n_q + rows, mask=row_mask, other=1.0)
        s_t = _mma(k, q_t, DOT_IEEE, ACC) * inv_k[:, None] * inv_q[None, :] * scale
        g_t = _grad_logits(s_t, lse[None, :], ids_k[:, None] == ids_q[None, :], pos_cnt[None, :],
                           col_mask[:, None] & row_mask[None, :], weight, keep, smooth)
        acc += _mma((g_t * inv_q[None, :]).to(q_t.dtype), tl.trans(q_t), DOT_IEEE, ACC)
    out = (split * 2 + d) * n_k + cols
    tl.store(dk_ptr + out[:, None] * dim + offs_d[None, :], acc * scale,
             mask=col_mask[:, None] & d_mask[None, :])


@triton.jit
def _fwd_finish_kernel(
    part_ptr, part_idx_ptr, seed_ptr, ok_ptr, n_ok, loss_ptr, lse_ptr, pos_cnt_ptr, neg_ptr,
    flag_ptr, n_q, row_start, splits, keep, smooth, loss_scale,
    MODE: tl.constexpr, HAS_IDS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Merges the column splits of ``_fwd_kernel``, reduces the loss and the input check, in
    one program.

    Per row of both directions (2·n_q, flattened direction-major), walking the splits in
    order: the candidates' (max, mass) merge as log-sum-exp partials do, and the negative by
    the reservoir rule with the merged masses (MODE 1: split s's candidate replaces the
    running one with probability mass_s / (mass so far + mass_s), one uniform per (row,
    split), Philox counter (split, global row, 1, direction)); MODE 2 keeps the first split
    with the largest candidate logit. Then lse = logaddexp(candidates, positives) (the
    positive is s_ii without ids), the row loss -Σ_j target_ij log softmax(s)_ij with
    target = keep·[pos]/|P| + smooth, and loss = loss_scale · Σ rows. One program walks every
    row in a fixed order, so the loss is deterministic. ``flag`` = 1 when every check flag of
    ``_prep_kernel`` is (the device assertion then reads one int: one launch, not two)."""
    n_rows = 2 * n_q
    plane = splits * n_rows
    total = tl.zeros((BLOCK,), ACC)
    if MODE == 1:
        seed = tl.load(seed_ptr)
    for start in range(0, n_rows, BLOCK):
        r = start + tl.arange(0, BLOCK)
        mask = r < n_rows
        m = tl.full((BLOCK,), float("-inf"), ACC)
        mass = tl.zeros((BLOCK,), ACC)
        best_idx = tl.full((BLOCK,), -1, tl.int64)
        if HAS_IDS:
            m_p = tl.full((BLOCK,), float("-inf"), ACC)
            l_p = tl.zeros((BLOCK,), ACC)
            pos_sum = tl.zeros((BLOCK,), ACC)
            pos_cnt = tl.zeros((BLOCK,), ACC)
        if SMOOTH:
            row_sum = tl.zeros((BLOCK,), ACC)
        if MODE == 1:
            rng_dir = (r >= n_q).to(tl.uint32)
            rng_row = (row_start + r - n_q * (r >= n_q).to(tl.int32)).to(tl.uint32)
        for s in range(0, splits):
            off = s * n_rows + r
            m_s = tl.load(part_ptr + off, mask=mask, other=float("-inf"))
            l_s = tl.load(part_ptr + plane + off, mask=mask, other=0.0)
            if MODE == 2:
                # strict: the first split wins ties; a split without candidates (-inf) never
                better = m_s > m
            m_new = tl.maximum(m, m_s)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            mass_s = l_s * tl.exp(m_s - shift)
            mass = mass * tl.exp(m - shift) + mass_s
            m = m_new
            if MODE == 1:
                u, _ = _uniforms(seed, (0 * r + s).to(tl.uint32), rng_row,
                                 (0 * r + 1).to(tl.uint32), rng_dir)
                better = u.to(ACC) * mass < mass_s
            if MODE != 0:
                idx = tl.load(part_idx_ptr + off, mask=mask, other=-1)
                best_idx = tl.where(better, idx, best_idx)
            if HAS_IDS:
                mp_s = tl.load(part_ptr + 2 * plane + off, mask=mask, other=float("-inf"))
                lp_s = tl.load(part_ptr + 3 * plane + off, mask=mask, other=0.0)
                mp_new = tl.maximum(m_p, mp_s)
                p_shift = tl.where(mp_new == float("-inf"), 0.0, mp_new)
                l_p = l_p * tl.exp(m_p - p_shift) + lp_s * tl.exp(mp_s - p_shift)
                m_p = mp_new
                pos_sum += tl.load(part_ptr + 4 * plane + off, mask=mask, other=0.0)
                pos_cnt += tl.load(part_ptr + 5 * plane + off, mask=mask, other=0.0)
            if SMOOTH:
                row_sum += tl.load(part_ptr + (6 if HAS_IDS else 3) * plane + off, mask=mask,
                                   other=0.0)
        has_c = mass > 0
        lse_c = tl.where(has_c, m + tl.log(tl.where(has_c, mass, 1.0)), float("-inf"))
        if HAS_IDS:
            # every valid row has a positive (its pair): lse_p is finite
            lse_p = tl.where(mask, m_p + tl.log(tl.where(mask, l_p, 1.0)), 0.0)
        else:
            pos_sum = tl.load(part_ptr + 2 * plane + r, mask=mask, other=0.0)  # s_ii, split 0
            pos_cnt = tl.full((BLOCK,), 1.0, ACC)
            lse_p = pos_sum
        hi = tl.maximum(lse_c, lse_p)
        lse = hi + tl.log(tl.exp(lse_c - hi) + tl.exp(lse_p - hi))
        # valid rows have |P| >= 1 (the pair itself); the clamp only guards the arithmetic
        row_loss = lse - keep * pos_sum / tl.maximum(pos_cnt, 1.0)
        if SMOOTH:
            row_loss -= smooth * row_sum
        total += tl.where(mask, row_loss, 0.0)
        tl.store(lse_ptr + r, lse, mask=mask)
        tl.store(pos_cnt_ptr + r, pos_cnt, mask=mask)
        if MODE != 0:
            tl.store(neg_ptr + r, best_idx, mask=mask)
    tl.store(loss_ptr, tl.sum(total, 0) * loss_scale)
    ok = tl.full((BLOCK,), 1, tl.int32)
    for start in range(0, n_ok, BLOCK):
        o = start + tl.arange(0, BLOCK)
        ok = tl.minimum(ok, tl.load(ok_ptr + o, mask=o < n_ok, other=1))
    tl.store(flag_ptr, tl.min(ok, 0))


@triton.jit
def _bwd_finish_kernel(
    img_ptr, txt_ptr, inv_ptr, dq_ptr, d_img_ptr, d_txt_ptr, dscale_part_ptr, dscale_ptr,
    n, dim, stride, splits, n_dscale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One process: sums the column splits of ``_rows_bwd_kernel`` (the gradient w.r.t. the
    normalised features, dq [splits, 2, n, D]) and takes it through the normalisation,
    dx = (dx̂ - x̂ (x̂·dx̂)) / ||x||, straight into the input dtype. Grid: (row blocks, 2).
    Program (0, 0) also sums the ``n_dscale`` per-row parts of dL/dscale in a fixed order
    (deterministic, and one launch fewer than a separate sum)."""
    pid = tl.program_id(0)
    d = tl.program_id(1)
    if pid == 0 and d == 0:
        part = tl.zeros((BLOCK_S,), ACC)
        for start in range(0, n_dscale, BLOCK_S):
            o = start + tl.arange(0, BLOCK_S)
            part += tl.load(dscale_part_ptr + o, mask=o < n_dscale, other=0.0)
        tl.store(dscale_ptr, tl.sum(part, 0))
    x_ptr = img_ptr
    out_ptr = d_img_ptr
    if d == 1:
        x_ptr = txt_ptr
        out_ptr = d_txt_ptr
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (offs_d[None, :] < dim)
    grad = tl.zeros((BLOCK_M, BLOCK_D), ACC)
    for s in range(0, splits):
        grad += tl.load(dq_ptr + ((s * 2 + d) * n + rows)[:, None] * dim + offs_d[None, :],
                        mask=mask, other=0.0)
    inv = tl.load(inv_ptr + d * n + rows, mask=row_mask, other=0.0)
    x_hat = tl.load(x_ptr + rows[:, None] * stride + offs_d[None, :], mask=mask,
                    other=0.0).to(ACC) * inv[:, None]
    dx = (grad - x_hat * tl.sum(x_hat * grad, 1)[:, None]) * inv[:, None]
    tl.store(out_ptr + rows[:, None] * dim + offs_d[None, :],
             dx.to(out_ptr.dtype.element_ty), mask=mask)
