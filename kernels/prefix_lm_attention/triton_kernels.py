"""The Triton kernels of the packed prefix-LM attention. :mod:`.launch` launches them and imports
this module only where triton is installed.

- tiled FlashAttention-2 over the packed tokens (any sample length): ``_sample_ids_kernel``,
  ``_fwd_kernel``, ``_bwd_preprocess_kernel``, ``_bwd_dkdv_kernel``, ``_bwd_dq_kernel``, with
  the per-token ranges ``_row_key_range`` / ``_col_query_range``;
- per (sample, head), for samples of at most 128 tokens: ``_sample_fwd_kernel`` and
  ``_sample_bwd_kernel`` (the whole backward in one launch), with ``_sample_span``,
  ``_sample_keys``, ``_poison_rows`` and ``_sample_mask``;
- shared: ``_mm`` (the dot per dtype), ``_rne`` and ``_offsets``.

The accounting of both paths is in the package docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    # DOT = 0: tensor-core dot of fp16/bf16 tiles, fp32 accumulation.
    # DOT = 1: fp32 inputs, full-precision products (a TF32 dot would cost ~1e-3 relative
    #          error and break parity with the fp32 reference).
    # DOT = 2: bf16 under TRITON_INTERPRET=1, whose bf16 dot returns garbage (triton 3.9):
    #          the bf16 values upcast exactly, so the fp32 dot gives the same products.
    if DOT == 0:
        c = tl.dot(a, b)
    elif DOT == 1:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return c


@triton.jit
def _rne(x, DOT: tl.constexpr):
    # Under TRITON_INTERPRET=1 (DOT = 2), fp32 -> bf16 casts truncate, doubling bf16 error
    # compared with the GPU's round-to-nearest-even: round the fp32 bits here so that the
    # following truncating cast is exact. On a GPU this is the identity.
    if DOT == 2:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _offsets(idx, WIDE_INDEX: tl.constexpr):
    # Token indices for addressing: 64-bit only when T·H·D reaches 2^31 elements; the 64-bit
    # [rows, head_dim] address tiles cost registers (on sm_90 the forward needs 254 per
    # thread with them, 186 without, and the dK/dV kernel stops spilling).
    if WIDE_INDEX:
        idx = idx.to(tl.int64)
    return idx


@triton.jit
def _row_key_range(SEQ_ID, CU, PLEN, offs_m, T):
    """Per query row: [lo, hi) of the keys it may attend (clamped: memory-safe on bad input)."""
    row_ok = offs_m < T
    sid = tl.load(SEQ_ID + offs_m, mask=row_ok, other=0)
    start = tl.load(CU + sid, mask=row_ok, other=0)
    plen = tl.load(PLEN + sid, mask=row_ok, other=0)
    lo = tl.minimum(tl.maximum(start, 0), offs_m)
    hi = tl.minimum(tl.maximum(offs_m + 1, start + plen), T)
    lo = tl.where(row_ok, lo, T)
    hi = tl.where(row_ok, hi, 0)
    return lo, hi


@triton.jit
def _col_query_range(SEQ_ID, CU, PLEN, offs_n, T):
    """Per key column s: [lo, hi) of the queries that attend it (mirror of _row_key_range)."""
    col_ok = offs_n < T
    sid = tl.load(SEQ_ID + offs_n, mask=col_ok, other=0)
    start = tl.load(CU + sid, mask=col_ok, other=0)
    end = tl.load(CU + sid + 1, mask=col_ok, other=0)
    plen = tl.load(PLEN + sid, mask=col_ok, other=0)
    # a prefix key is seen by the whole sample, a text key by itself and what follows
    lo = tl.where(offs_n < start + plen, start, offs_n)
    lo = tl.minimum(tl.maximum(lo, 0), offs_n)
    hi = tl.minimum(tl.maximum(end, offs_n + 1), T)
    lo = tl.where(col_ok, lo, T)
    hi = tl.where(col_ok, hi, 0)
    return lo, hi


@triton.jit
def _sample_ids_kernel(CU, SEQ_ID, T, n_samples, steps, BLOCK: tl.constexpr):
    """``sample_ids`` in one launch: per token t, the largest i with cu[i] <= t (a binary
    search of ``steps`` = bit_length(B) + 1 halvings over cu[0..B]), clamped to [0, B - 1].
    Every probe stays inside cu whatever its values, so invalid cu_seqlens give in-range
    ids (wrong numbers, never a crash), as the clamp of the PyTorch version does."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = tl.full([BLOCK], 1, dtype=tl.int32) * (n_samples + 1)
    for _ in range(steps):
        mid = (lo + hi) // 2  # lo <= mid < hi <= B + 1 while hi > lo + 1; lo once they meet
        go = tl.load(CU + mid) <= t
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    tl.store(SEQ_ID + t, tl.minimum(lo, n_samples - 1), mask=t < T)


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, SEQ_ID, CU, PLEN,
    T, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # grid = (query blocks over the packed tokens, heads). A block may straddle several short
    # samples: every row carries its own key range, and the block visits the union.
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    lo_m, hi_m = _row_key_range(SEQ_ID, CU, PLEN, offs_m, T)
    lo = tl.min(lo_m, axis=0)
    hi = tl.max(hi_m, axis=0)

    rows = _offsets(offs_m, WIDE_INDEX)
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Online softmax in base 2: qk_scale already holds softmax_scale * log2(e), so exp2 is
    # one instruction and the stored LSE is in log2 units as well.
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        cols = _offsets(offs_n, WIDE_INDEX)
        col_ok = offs_n < hi
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        s = _mm(q, tl.trans(k), DOT) * qk_scale
        allowed = (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] < hi_m[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with no allowed key yet keeps m = -inf: shift by 0 instead (no inf - inf NaN)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _mm(_rne(p, DOT).to(v.dtype), v, DOT)
        m_i = m_new
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    acc = acc / l_safe[:, None]
    tl.store(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             _rne(acc, DOT).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + h * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _bwd_preprocess_kernel(
    O, DO, DELTA, T,
    stride_ot, stride_oh, stride_dot, stride_doh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    WIDE_INDEX: tl.constexpr,
):
    # delta = rowsum(dO * O) in fp32: the softmax-backward term shared by dK/dV and dQ.
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = _offsets(offs_m, WIDE_INDEX)
    o = tl.load(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(DELTA + h * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, SEQ_ID, CU, PLEN,
    T, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # grid = (key blocks, heads); each program owns dK, dV of its keys (no atomics) and
    # visits only the query blocks that attend them: the rest of the sample after a text
    # key, the whole sample for a prefix key.
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < T
    d_ok = offs_d < HEAD_DIM
    lo_n, hi_n = _col_query_range(SEQ_ID, CU, PLEN, offs_n, T)
    lo = tl.min(lo_n, axis=0)
    hi = tl.max(hi_n, axis=0)

    cols = _offsets(offs_n, WIDE_INDEX)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = _offsets(offs_m, WIDE_INDEX)
        row_ok = offs_m < hi
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * T + offs_m, mask=row_ok, other=0.0)
        # work on the transposed tile (keys x queries) so dK and dV come out of plain dots
        s_t = _mm(k, tl.trans(q), DOT) * qk_scale
        allowed = (offs_m[None, :] >= lo_n[:, None]) & (offs_m[None, :] < hi_n[:, None])
        p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _mm(_rne(p_t, DOT).to(do.dtype), do, DOT)
        dp_t = _mm(v, tl.trans(do), DOT)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _mm(_rne(ds_t, DOT).to(q.dtype), q, DOT)
    dk = dk * sm_scale
    tl.store(DK + cols[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
             _rne(dk, DOT).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + cols[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
             _rne(dv, DOT).to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, SEQ_ID, CU, PLEN,
    T, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # grid = (query blocks, heads), the same key ranges as the forward; recomputes P from
    # the saved LSE instead of storing it.
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < T
    d_ok = offs_d < HEAD_DIM
    lo_m, hi_m = _row_key_range(SEQ_ID, CU, PLEN, offs_m, T)
    lo = tl.min(lo_m, axis=0)
    hi = tl.max(hi_m, axis=0)

    rows = _offsets(offs_m, WIDE_INDEX)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask,
                other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + h * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + h * T + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        cols = _offsets(offs_n, WIDE_INDEX)
        col_ok = offs_n < hi
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        s = _mm(q, tl.trans(k), DOT) * qk_scale
        allowed = (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] < hi_m[:, None])
        p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), DOT)
        ds = p * (dp - delta[:, None])
        dq += _mm(_rne(ds, DOT).to(k.dtype), k, DOT)
    dq = dq * sm_scale
    tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             _rne(dq, DOT).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _sample_span(CU, PLEN, b, T, BLOCK: tl.constexpr):
    """Sample b's packed start, its length (at most BLOCK), its prefix length and its true
    length, clamped so that bad metadata (validate=False) gives wrong numbers, never an
    out-of-bounds access."""
    start = tl.minimum(tl.maximum(tl.load(CU + b), 0), T)
    end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), T)
    n = tl.minimum(end - start, BLOCK)
    plen = tl.load(PLEN + b)
    return start, n, plen, end - start


@triton.jit
def _sample_keys(K, V, start, n, h, stride_kt, stride_kh, stride_vt, stride_vh,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 WIDE_INDEX: tl.constexpr):
    """All keys and values of one sample's head, loaded once into a [BLOCK, BLOCK_D] tile
    (rows past the sample and columns past head_dim are 0), with the offsets and masks the
    per-sample kernels index by."""
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    tok_n = _offsets(start + offs_n, WIDE_INDEX)
    kv_mask = (offs_n < n)[:, None] & d_ok[None, :]
    k = tl.load(K + tok_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    v = tl.load(V + tok_n[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask,
                other=0.0)
    return offs_n, offs_d, d_ok, tok_n, kv_mask, k, v


@triton.jit
def _poison_rows(X, stride_t, start, n, full, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WIDE_INDEX: tl.constexpr):
    # Rows n..full of a sample longer than the tile (max_seqlen too small, validate=False)
    # become NaN instead of whatever the output buffer held: the error shows in the loss.
    # No iteration for valid input.
    offs_d = tl.arange(0, BLOCK_D)
    for m0 in range(n, full, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        tok = _offsets(start + offs_m, WIDE_INDEX)
        mask = (offs_m < full)[:, None] & (offs_d < HEAD_DIM)[None, :]
        nan = tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32)
        tl.store(X + tok[:, None] * stride_t + offs_d[None, :], nan.to(X.dtype.element_ty),
                 mask=mask)


@triton.jit
def _sample_mask(offs_m, offs_n, n, plen):
    # Local row r may attend local column c when c <= r or c is in the prefix (c < plen):
    # the whole prefix-LM mask of one sample is this one scalar. Pad rows/columns (>= n) are
    # masked; every real row keeps its diagonal, so no real row is fully masked.
    rows = offs_m[:, None]
    cols = offs_n[None, :]
    return ((cols <= rows) | (cols < plen)) & (cols < n) & (rows < n)


@triton.jit
def _sample_fwd_kernel(
    Q, K, V, O, LSE, CU, PLEN,
    T, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # grid = (samples, heads): one program owns all queries and all keys of its sample. k and
    # v are loaded once; the queries go by in slices of BLOCK_M rows, each against every key
    # of the sample in one [BLOCK_M, BLOCK] score tile, so the softmax of a row is one pass
    # (no running max, no rescaling of the accumulator), and slices past the sample's length
    # are never computed (a 75-token sample at BLOCK_M = 32 costs 96 rows, not 128).
    b = tl.program_id(0)
    h = tl.program_id(1)
    start, n, plen, full = _sample_span(CU, PLEN, b, T, BLOCK)
    offs_n, offs_d, d_ok, tok_n, kv_mask, k, v = _sample_keys(
        K, V, start, n, h, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK,
        BLOCK_D, WIDE_INDEX)
    for m0 in range(0, n, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        tok_m = _offsets(start + offs_m, WIDE_INDEX)
        q_mask = (offs_m < n)[:, None] & d_ok[None, :]
        q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        s = _mm(q, tl.trans(k), DOT) * qk_scale
        s = tl.where(_sample_mask(offs_m, offs_n, n, plen), s, float("-inf"))
        m = tl.max(s, axis=1)
        m = tl.where(m == float("-inf"), 0.0, m)  # pad rows: exp2(-inf) = 0, no NaN
        p = tl.exp2(s - m[:, None])
        l = tl.sum(p, axis=1)
        l = tl.where(l > 0.0, l, 1.0)
        acc = _mm(_rne(p, DOT).to(v.dtype), v, DOT) / l[:, None]
        tl.store(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 _rne(acc, DOT).to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + h * T + start + offs_m, m + tl.log2(l), mask=offs_m < n)
    _poison_rows(O + h * stride_oh, stride_ot, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                 WIDE_INDEX)


@triton.jit
def _sample_bwd_kernel(
    Q, K, V, DO, DQ, DK, DV, LSE, CU, PLEN,
    T, qk_scale, sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
    stride_dvt, stride_dvh,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
):
    # grid = (samples, heads), the whole backward in one launch. Per slice of BLOCK_M
    # queries, from one score tile against all keys of the sample: S = Q K^T,
    # P = exp2(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)),
    # dQ = dS K (complete: the slice saw every key it may attend, so it is stored at once),
    # dK += dS^T Q: five matmuls, nothing recomputed. The program owns every query and key
    # of its sample, so no atomics and no second pass. rowsum(P * dP) equals rowsum(dO * O)
    # and needs neither O nor a preprocess launch.
    b = tl.program_id(0)
    h = tl.program_id(1)
    start, n, plen, full = _sample_span(CU, PLEN, b, T, BLOCK)
    offs_n, offs_d, d_ok, tok_n, kv_mask, k, v = _sample_keys(
        K, V, start, n, h, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK,
        BLOCK_D, WIDE_INDEX)
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, n, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        tok_m = _offsets(start + offs_m, WIDE_INDEX)
        q_mask = (offs_m < n)[:, None] & d_ok[None, :]
        q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * T + start + offs_m, mask=offs_m < n, other=0.0)
        s = _mm(q, tl.trans(k), DOT) * qk_scale
        p = tl.where(_sample_mask(offs_m, offs_n, n, plen), tl.exp2(s - lse[:, None]), 0.0)
        dv += _mm(tl.trans(_rne(p, DOT).to(do.dtype)), do, DOT)
        dp = _mm(do, tl.trans(v), DOT)
        delta = tl.sum(p * dp, axis=1)
        ds = _rne(p * (dp - delta[:, None]), DOT).to(q.dtype)
        dq = _mm(ds, k, DOT) * sm_scale
        tl.store(DQ + tok_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                 _rne(dq, DOT).to(DQ.dtype.element_ty), mask=q_mask)
        dk += _mm(tl.trans(ds), q, DOT)
    dk = dk * sm_scale
    tl.store(DK + tok_n[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
             _rne(dk, DOT).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + tok_n[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
             _rne(dv, DOT).to(DV.dtype.element_ty), mask=kv_mask)
    _poison_rows(DQ + h * stride_dqh, stride_dqt, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                 WIDE_INDEX)
    _poison_rows(DK + h * stride_dkh, stride_dkt, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                 WIDE_INDEX)
    _poison_rows(DV + h * stride_dvh, stride_dvt, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                 WIDE_INDEX)
