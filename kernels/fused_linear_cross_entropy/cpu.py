"""The row-block PyTorch path of ``reduction="mean"``/``"sum"``: the loss and its gradients from
ONE pass over the logits (:func:`reference_forward_reduced`; its accounting is in its docstring).

``backend="auto"`` runs it on CPU for those reductions (it beats the C++ op there: see
:func:`~unigen.kernels.fused_linear_cross_entropy.op.fused_linear_cross_entropy`), and
``backend="torch"`` runs it anywhere. The block size is set by ``REDUCED_CPU_BLOCK_BYTES``, read
at call time (tests shrink it here).
"""

from __future__ import annotations

import torch

from .reference import _apply_softcap, _math_dtype, _softcap_slope, _valid_rows

# Rows per [rows, V] logits block of the reduced CPU path. Measured on the GPT-2 head (D = 768,
# V = 50257, fp32, 1 core, fwd+bwd): the ~80-row blocks of a 16 MiB budget make skinny GEMMs
# (the logits GEMM ran at ~40-60 GFLOP/s against ~85 at 256+ rows in the transposed form below,
# dH at 77 against 90). At N = 2048: 5.77 s with 64 MiB (~330 rows), 5.63 s with 128 MiB
# (~660 rows), 5.66 s with 256 MiB; the naive formula 7.83 s, the C++ op 7.35 s.
REDUCED_CPU_BLOCK_BYTES = 128 * 2**20
# Vocabulary rows per cache-resident slice of the exp pass (× ~660 columns × 4 B: ~1.3 MB).
_EXP_SLICE = 512


def _reduced_row_chunk(n_rows, vocab, elem_size):
    """Rows per block of :func:`reference_forward_reduced` (a multiple of 16, at least 16): at
    most ``REDUCED_CPU_BLOCK_BYTES`` of logits, and at most an eighth of the rows, so that the
    block stays a small fraction of the naive formula's N×V logits (and their gradient) for
    small batches too (≤ 1/16 of its peak)."""
    rows = REDUCED_CPU_BLOCK_BYTES // max(1, vocab * elem_size)  # read at call time (tests shrink it)
    rows = min(rows, -(-n_rows // 8))
    return max(16, rows // 16 * 16)


@torch.no_grad()  # gradients by hand: no autograd graph, whoever calls it
def reference_forward_reduced(hidden, weight, bias, target, row_scale, ignore_index,
                              label_smoothing, z_loss, need_hidden, need_weight, need_bias,
                              softcap=0.0, row_chunk=None, stats=True, fp32_logits=True):
    """``Σ_n row_scale_n·loss_n`` and, when asked, its gradients, from ONE pass over the logits.

    For "mean" and "sum" the gradient of every row is known up to the scalar upstream gradient
    while the logits are at hand (Liger-Kernel's scheme), so rows are processed in blocks of R
    against the whole vocabulary and each logits block serves the loss and the gradient. With
    E = exp(Z - max) (the block's unnormalised softmax) and the per-row
    ``f = scale·(1 + 2·z_loss·lse)/ΣE``, the gradient of the block is

        dZ = f·E - scale·ε/V - scale·(1-ε)·onehot(t)

    and its two GEMMs take the row factor and the two constant terms outside the [R, V] block:
    ``dH = f·(E·W) - scale·ε/V·Σ_v W_v - scale·(1-ε)·W[t]`` and ``dW += Eᵀ·(f·H)``, with the
    one-hot term an index_add of R rows and the ε term one vector added to every row of dW at
    the end. So E is never rescaled in memory. (With softcap, dZ also carries the cap's slope
    per element and is formed in place as the formula says.)

    - FLOPs: 2·N·D·V (logits) + 2·N·D·V (dH, if hidden needs it) + 2·N·D·V (dW, if weight
      needs it) = 6·N·D·V, against 8·N·D·V for forward + recompute; ~3 elementwise FLOPs and
      one exp per logit (+ the cap's tanh and slope when asked).
    - memory traffic per block: the GEMM writes R·V logits; a max pass reads them; the exp
      pass rewrites them in L2-sized slices (its row sums taken while the slice is in cache);
      the dH and dW GEMMs read them once each: 5 passes over R·V floats (8 with softcap), and
      W (V·D) read by each of the three GEMMs of every block (N/R ≈ 13 blocks at N = 8192).
    - working memory: one [V, R] block in the math dtype (R = ``REDUCED_CPU_BLOCK_BYTES`` /
      V·4, ~660 rows at V = 50257: 128 MiB, and at most N/8 rows), two with softcap; the
      gradients are the outputs. Measured at the GPT-2 head (N = 8192, fp32): 251 MB above the
      inputs, gradients included, against 4564 MB for the naive formula (0.055×).
    - ``stats=False`` skips the argmax pass (the correctness statistic is then empty);
      ``fp32_logits`` is accepted for the Triton path's signature: the math here is fp32 always.

    The logits are formed as (W·Hᵀ), [V, R]: with V as the GEMM's long side it runs at ~85
    GFLOP/s per core against ~60 for H·Wᵀ written row-major (R = 256-512, D = 768,
    V = 50257). Ignored rows are dropped before any matmul (one host-side count: this is the
    CPU path).
    """
    n, vocab = target.shape[0], weight.shape[0]
    acc = _math_dtype(hidden.dtype)
    total = hidden.new_zeros((), dtype=acc)
    lse_out = hidden.new_zeros(n, dtype=acc)
    correct = torch.zeros(n if stats else 0, dtype=torch.bool, device=hidden.device)
    grad_h = torch.zeros_like(hidden, dtype=acc) if need_hidden else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_weight else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    need_grad = need_hidden or need_weight or need_bias
    eps = label_smoothing
    rows = _valid_rows(target, ignore_index)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    w_colsum = w.sum(dim=0) if (need_hidden and eps > 0.0 and softcap == 0.0) else None
    smooth_w = torch.zeros(weight.shape[1], dtype=acc, device=weight.device) if need_weight else None
    step = row_chunk or _reduced_row_chunk(rows.numel(), vocab, torch.finfo(acc).bits // 8)
    for start in range(0, rows.numel(), step):
        r = rows[start:start + step]
        k = r.numel()
        h = hidden.index_select(0, r).to(acc)
        t = target.index_select(0, r).long()
        scale = row_scale.index_select(0, r).to(acc)
        cols = torch.arange(k, device=hidden.device)
        zt = torch.addmm(b[:, None], w, h.t()) if b is not None else w @ h.t()  # [V, R]
        _apply_softcap(zt, softcap)
        z_target = zt[t, cols]
        loss = -(1.0 - eps) * z_target
        if eps > 0.0:
            loss -= (eps / vocab) * zt.sum(dim=0)
        if stats:
            correct[r] = zt.argmax(dim=0) == t
        slope = _softcap_slope(zt, softcap) if (need_grad and softcap > 0.0) else None
        z_max = zt.amax(dim=0)
        e_sum = torch.zeros_like(z_max)
        for v0 in range(0, vocab, _EXP_SLICE):  # E = exp(Z - max) in place, slice by slice
            e_slice = zt[v0:v0 + _EXP_SLICE].sub_(z_max).exp_()
            e_sum += e_slice.sum(dim=0)
        e = zt
        lse = z_max + torch.log(e_sum)
        loss += lse
        if z_loss > 0.0:
            loss += z_loss * lse * lse
        total += (scale * loss).sum()
        lse_out[r] = lse
        if not need_grad:
            continue
        factor = scale * (1.0 + 2.0 * z_loss * lse) / e_sum
        on_target = (1.0 - eps) * scale
        if slope is not None:
            # dZ in place: f·E - scale·ε/V - scale·(1-ε)·onehot, times the cap's slope
            dz = e.mul_(factor)
            if eps > 0.0:
                dz.sub_(scale * (eps / vocab))
            dz[t, cols] -= on_target
            dz.mul_(slope)
            del slope
            if need_hidden:
                grad_h.index_copy_(0, r, dz.t() @ w)
            if need_weight:
                # addmm(out=) rather than addmm_: the same kernel, and the FLOP counter (which
                # knows aten.addmm, not the in-place aten.addmm_) sees it
                torch.addmm(grad_w, dz, h, out=grad_w)
            if need_bias:
                grad_b += dz.sum(dim=1)
            continue
        if need_hidden:
            dh = (e.t() @ w).mul_(factor[:, None])
            dh.sub_(on_target[:, None] * w.index_select(0, t))
            if eps > 0.0:
                dh.sub_((scale * (eps / vocab))[:, None] * w_colsum)
            grad_h.index_copy_(0, r, dh)
        if need_weight:
            torch.addmm(grad_w, e, factor[:, None] * h, out=grad_w)
            grad_w.index_add_(0, t, on_target[:, None] * h, alpha=-1.0)
            if eps > 0.0:
                smooth_w += (scale * (eps / vocab))[:, None].mul(h).sum(dim=0)
        if need_bias:
            grad_b += e @ factor
            grad_b.index_add_(0, t, on_target, alpha=-1.0)
            if eps > 0.0:
                grad_b -= (scale * (eps / vocab)).sum()
    if need_weight and label_smoothing > 0.0:
        grad_w -= smooth_w  # the ε/V term, the same for every vocabulary row
    return (total, lse_out, correct,
            grad_h.to(hidden.dtype) if need_hidden else None,
            grad_w.to(weight.dtype) if need_weight else None,
            grad_b.to(bias.dtype) if need_bias else None)
