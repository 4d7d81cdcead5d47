"""Fused linear + vocabulary cross-entropy: ``F.cross_entropy(F.linear(h, W, b), y)`` without the
N×V logits.

Layout of this file (the house pattern):

1. argument checking and the per-row loss definition shared by every backend;
2. the readable PyTorch reference (fp32 math, vocabulary-chunked, also the CPU fallback);
3. the Triton kernels and their launchers;
4. the ``torch.library`` custom ops (forward, backward, fake kernels, autograd) that dispatch to
   the reference, the Triton kernels or the C++ op ``torch.ops.unigen.fused_linear_cross_entropy``;
5. the functional form and the ``nn.Module``.

Per valid row n (target t = target[n] != ignore_index), with logits z = h_n·Wᵀ + b:

    loss_n = lse(z) - (1-ε)·z_t - (ε/V)·Σ_j z_j + z_loss·lse(z)²

which equals PyTorch's label-smoothed cross-entropy plus the z-loss of PaLM. With ``softcap`` c > 0
(Gemma 2's ``final_logit_softcapping``) every logit is first replaced by z' = c·tanh(z/c), the
loss is that of z', and the logit gradient below is multiplied by ∂z'/∂z = 1 - (z'/c)².

The ops return the unreduced row losses; the reduction and ``token_weights`` are applied on top
with ordinary torch ops, so autograd hands the backward a per-row gradient ``g_n`` and every
reduction gets exact gradients from the same kernels:

    ∂loss/∂z_nj = g_n·[softmax(z)_j·(1 + 2·z_loss·lse) - (1-ε)·[j = t] - ε/V]

Two paths (the accounting is in each function's docstring):

- ``reduction="mean"``/``"sum"`` (and token weights without a gradient): the gradient of every
  row is known, up to the scalar upstream gradient, while its logits are at hand, so one
  row-chunked pass computes the loss and the gradients in the forward (Liger-Kernel's scheme)
  and the backward only rescales them: 6·N·D·V matmul FLOPs. On CUDA
  (:func:`triton_forward_reduced`): tensor-core GEMMs for the logits of a row block into one
  reused buffer, ``_flce_rows_kernel`` for lse/loss/dZ in place, GEMMs for dH (rows written
  once) and ``_flce_dw_kahan_kernel`` for dW (compensated bf16 accumulation across blocks;
  an fp32 addmm for fp32 inputs). On CPU (:func:`reference_forward_reduced`): the same scheme
  in torch, with ~660-row blocks. No double backward (create_graph) and one backward per graph:
  both refused with a clear error.
- ``reduction="none"`` (or token weights that need a gradient): fused Triton kernels that never
  write the logits (forward :func:`triton_forward`: online lse per tile, two row reductions per
  tile, the target logit gathered once outside the tile loop; backward :func:`triton_backward`:
  logits recomputed per vocabulary chunk, the gradient applied by GEMMs; 8·N·D·V in all), the
  vocabulary-chunked reference on CPU. 16-bit inputs take 128×128×32 tiles in grouped launch
  order (``TILE_CANDIDATES``, one pick per shape class, cached).

The argmax statistic (``return_stats``) is computed only when asked (the C++ op always does).

Autocast (``torch.autocast``, CPU and CUDA): hidden, weight and bias are cast to the autocast
dtype at entry, as autocast casts the inputs of the ``F.linear`` this op fuses; the math inside
stays fp32 (every backend runs with autocast disabled) and the loss comes back in fp32, as
autocast's ``F.cross_entropy`` does (see :mod:`unigen.kernels.common.autocast`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from unigen._extension import cpp_ops_available

from ..common.autocast import autocast_disabled, autocast_dtype, cast_inputs
from ..common.backend import resolve_backend, triton_available, triton_interpreting
from ..common.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_saved_storage,
    check_tensor,
    needs_wide_index,
)

OP = "fused_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")

# Transient logits blocks of the CPU paths stay near this size (the C++ op uses the same).
BLOCK_BUDGET_BYTES = 32 * 2**20


def _vocab_chunk(rows, vocab, elem_size=4):
    """Vocabulary columns per [rows, chunk] logits block (a multiple of 256, at least 256)."""
    cols = BLOCK_BUDGET_BYTES // max(1, rows * elem_size)
    return min(vocab, max(256, cols // 256 * 256))


class CrossEntropyStats(NamedTuple):
    """Per-row statistics for logging (detached, fp32/bool, 0/False on ignored rows)."""

    lse: torch.Tensor  # log-sum-exp of the logits
    correct: torch.Tensor  # argmax(logits) == target


# ---------------------------------------------------------------------------------------------
# 1. argument checking
# ---------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, target, bias, token_weights, ignore_index, label_smoothing,
                  z_loss, reduction, softcap=0.0):
    check_tensor(hidden, "hidden", op=OP, dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", op=OP, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_tensor(target, "target", op=OP, dtypes=INDEX_DTYPES, device=hidden.device)
    if hidden.dim() < 1:
        raise ValueError(f"{OP}: hidden must have shape [..., D], got a scalar")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    vocab, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(f"{OP}: hidden has last dimension {hidden.shape[-1]} but weight is "
                         f"[V={vocab}, D={dim}]")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: target shape {tuple(target.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor(bias, "bias", op=OP, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
        if bias.shape[0] != vocab:
            raise ValueError(f"{OP}: bias has {bias.shape[0]} entries, weight has V={vocab} rows")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{OP}: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    if token_weights is not None:
        check_tensor(token_weights, "token_weights", op=OP, dtypes=FLOAT_DTYPES, device=hidden.device)
        if tuple(token_weights.shape) != tuple(target.shape):
            raise ValueError(f"{OP}: token_weights shape {tuple(token_weights.shape)} must equal "
                             f"target shape {tuple(target.shape)}")
    if target.numel() == 0:
        raise ValueError(f"{OP}: empty batch (target has no elements)")
    if vocab == 0 or dim == 0:
        raise ValueError(f"{OP}: weight must be non-empty, got shape {tuple(weight.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{OP}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"{OP}: z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and softcap >= 0.0 and math.isfinite(softcap)):
        raise ValueError(f"{OP}: softcap must be None or a finite float >= 0 (0 = no cap), got {softcap!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_target_range(target, vocab, ignore_index)


def _check_target_range(target, vocab, ignore_index):
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    msg = f"{OP}: target values must be in [0, {vocab}) or equal ignore_index={ignore_index}"
    if target.device.type == "cuda" or torch.compiler.is_compiling():
        # A host check would sync (or break the graph); the device assert fails with this message.
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        position = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{msg}; got {target[position].item()} at position {position}")


# ---------------------------------------------------------------------------------------------
# 2. the PyTorch reference (fp32, vocabulary-chunked: never holds more than [rows, chunk])
# ---------------------------------------------------------------------------------------------


def _valid_rows(target, ignore_index):
    """Indices of the rows that carry a loss: ignored rows are dropped before any matmul."""
    return (target != ignore_index).nonzero().squeeze(1)


def _math_dtype(dtype):
    """fp32 math for fp16/bf16/fp32 inputs, fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _apply_softcap(z, softcap):
    """z ← c·tanh(z/c) in place (no-op for c = 0), in the transformers models' order of steps."""
    if softcap > 0.0:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _softcap_slope(z_capped, softcap):
    """∂z'/∂z = 1 - (z'/c)² from the capped logits (a new tensor)."""
    return 1.0 - (z_capped / softcap).square_()


def reference_forward(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                      softcap=0.0, vocab_chunk=None, stats=True):
    """Row losses, lse and argmax-correctness (empty unless ``stats``); fp32 math one vocabulary
    chunk at a time."""
    n, vocab = target.shape[0], weight.shape[0]
    acc = _math_dtype(hidden.dtype)
    loss = hidden.new_zeros(n, dtype=acc)
    lse_out = hidden.new_zeros(n, dtype=acc)
    correct = torch.zeros(n if stats else 0, dtype=torch.bool, device=hidden.device)
    rows = _valid_rows(target, ignore_index)
    if rows.numel() == 0:
        return loss, lse_out, correct
    h = hidden.index_select(0, rows).to(acc)
    t = target.index_select(0, rows).long()
    vocab_chunk = vocab_chunk or _vocab_chunk(rows.numel(), vocab)
    m = h.new_full((rows.numel(),), -math.inf)  # running max (online log-sum-exp)
    s = h.new_zeros(rows.numel())  # running Σ exp(z - m)
    z_target = h.new_zeros(rows.numel())
    z_sum = h.new_zeros(rows.numel())
    best = h.new_full((rows.numel(),), -math.inf)
    best_idx = torch.zeros_like(t)
    for start in range(0, vocab, vocab_chunk):
        stop = min(start + vocab_chunk, vocab)
        z = h @ weight[start:stop].to(acc).t()
        if bias is not None:
            z += bias[start:stop].to(acc)
        _apply_softcap(z, softcap)
        chunk_max, chunk_arg = z.max(dim=1)
        m_new = torch.maximum(m, chunk_max)
        s = s * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(dim=1)
        m = m_new
        if stats:
            better = chunk_max > best  # strict: the first maximum wins, as torch.argmax
            best = torch.where(better, chunk_max, best)
            best_idx = torch.where(better, chunk_arg + start, best_idx)
        in_chunk = (t >= start) & (t < stop)
        local = (t - start).clamp(0, stop - start - 1)
        z_target += torch.where(in_chunk, z.gather(1, local[:, None]).squeeze(1), 0.0)
        if label_smoothing > 0.0:
            z_sum += z.sum(dim=1)
    lse = m + torch.log(s)
    row_loss = lse - (1.0 - label_smoothing) * z_target
    if label_smoothing > 0.0:
        row_loss = row_loss - (label_smoothing / vocab) * z_sum
    if z_loss > 0.0:
        row_loss = row_loss + z_loss * lse * lse
    loss[rows] = row_loss
    lse_out[rows] = lse
    if stats:
        correct[rows] = best_idx == t
    return loss, lse_out, correct


def _logit_grad_chunk(z, lse, t_local, in_chunk, g, label_smoothing, z_loss, vocab):
    """∂loss/∂z for one [rows, chunk] block of fp32 logits (overwrites z)."""
    p = torch.exp(z.sub_(lse[:, None]))
    if z_loss > 0.0:
        p.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
    if label_smoothing > 0.0:
        p.sub_(label_smoothing / vocab)
    on_target = in_chunk.to(p.dtype).mul_(-(1.0 - label_smoothing))
    p.scatter_add_(1, t_local[:, None], on_target[:, None])
    return p.mul_(g[:, None])


def reference_backward(grad_rows, hidden, weight, bias, target, lse, ignore_index, label_smoothing,
                       z_loss, need_hidden, need_weight, need_bias, softcap=0.0, vocab_chunk=None):
    """Gradients for hidden, weight and bias given the per-row loss gradient ``grad_rows``."""
    vocab = weight.shape[0]
    acc = _math_dtype(hidden.dtype)
    grad_h = torch.zeros_like(hidden, dtype=acc) if need_hidden else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_weight else None
    grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    rows = _valid_rows(target, ignore_index)
    if rows.numel() > 0:
        h = hidden.index_select(0, rows).to(acc)
        t = target.index_select(0, rows).long()
        g = grad_rows.index_select(0, rows).to(acc)
        row_lse = lse.index_select(0, rows).to(acc)
        vocab_chunk = vocab_chunk or _vocab_chunk(rows.numel(), vocab)
        gh = torch.zeros_like(h) if need_hidden else None
        for start in range(0, vocab, vocab_chunk):
            stop = min(start + vocab_chunk, vocab)
            w = weight[start:stop].to(acc)
            z = h @ w.t()
            if bias is not None:
                z += bias[start:stop].to(acc)
            slope = _softcap_slope(_apply_softcap(z, softcap), softcap) if softcap > 0.0 else None
            in_chunk = (t >= start) & (t < stop)
            local = (t - start).clamp(0, stop - start - 1)
            dz = _logit_grad_chunk(z, row_lse, local, in_chunk, g, label_smoothing, z_loss, vocab)
            if slope is not None:
                dz.mul_(slope)
            if need_hidden:
                gh += dz @ w
            if need_weight:
                grad_w[start:stop] = dz.t() @ h
            if need_bias:
                grad_b[start:stop] = dz.sum(dim=0)
        if need_hidden:
            grad_h[rows] = gh
    return (
        grad_h.to(hidden.dtype) if need_hidden else None,
        grad_w.to(weight.dtype) if need_weight else None,
        grad_b.to(bias.dtype) if need_bias else None,
    )


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


# ---------------------------------------------------------------------------------------------
# 3. Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
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
        GROUP_M: tl.constexpr = 1,
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
        dz = tl.where(col_mask[None, :], dz, 0.0)
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
        n_rows, vocab, stride_z, stride_dz, label_smoothing, z_loss, softcap,
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
            z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
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
                mask = row_mask[:, None] & (cols < vocab)[None, :]
                z = tl.load(z_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                if HAS_SOFTCAP:
                    z = _softcap(z, softcap)
                dz = (coef * tl.exp(z - lse[:, None]) - off_target
                      - tl.where(cols[None, :] == tgt[:, None], on_target, 0.0))
                if HAS_SOFTCAP:
                    capped = z / softcap
                    dz = dz * (1.0 - capped * capped)
                dz = _round_to_bf16(dz, RN_BF16)
                if NARROW:
                    tl.debug_barrier()
                tl.store(dz_rows + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)

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


# Candidate tiles of the reduction="none" kernels (BLOCK_N rows × BLOCK_V vocabulary × BLOCK_D,
# GROUP_M row blocks per group of the launch order). ``_triton_config`` picks one per shape class;
# ``benchmarks/test_bench_cross_entropy.py::test_ours_tile_sweep`` times them all on a GPU (the
# winner becomes the pick below). Registers/spills from the sm_90 compile check
# (``tests/kernels/gpu_compile_check.py cross_entropy bf16``; ``UNIGEN_FLCE_TILE=<name>`` compiles
# another candidate), forward / logit-gradient kernel, both with bias and softcap:
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
    """The tiles for one shape class (cached: a dict lookup per launch after the first)."""
    key = (interpreting, *_shape_class(dtype, dim))
    cfg = _CONFIG_CACHE.get(key)
    if cfg is None:
        if interpreting:
            cfg = dict(INTERPRETER_TILES)
        elif key[1] == "16bit":
            cfg = dict(TILE_CANDIDATES["n128v128d32g8w16s3"])
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
    GPUs: 128×128×32 tiles, GROUP_M = 8, 16 warps, 3 stages; fp32: 64×128×64 at 8 warps, 3
    stages. Not yet timed on a GPU: ``override`` lets the benchmarks try the other candidates.
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
                    config=None):
    """Gradients for hidden, weight and bias, one vocabulary chunk at a time.

    Working memory beyond the gradients themselves: the fp32 dH accumulator (4·N·D bytes; one
    rounding at the end instead of one per chunk) and one dZ chunk (~``DZ_BUDGET_BYTES``).

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
    chunk = _backward_vocab_chunk(n, vocab, hidden.element_size(), cfg["BLOCK_V"])
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
            WIDE_INDEX=wide,
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


# The row-chunked reduced path (``triton_forward_reduced``). Its working memory is one [R, V]
# logits block in the input dtype, plus, for a 16-bit dW, the bf16 compensation buffer of the
# Kahan accumulation (V·D·2 bytes); this budget bounds the two together. At the target shape
# (N = 20480, D = 768, V = 50257, bf16): 77.2 MB of compensation + a 224-row block (22.5 MB)
# = 99.7 MB (95.1 MiB). A larger budget buys larger row blocks, hence fewer passes over W and
# over dW's sum/compensation (see the accounting in ``triton_forward_reduced``).
REDUCED_WORKING_BYTES = 96 * 2**20
# GEMMs of fewer rows are mostly overhead: below this the budget is exceeded rather than obeyed.
MIN_ROW_BLOCK = 64


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


def _reduced_row_block(n, vocab, dim, elem_size, compensated):
    """Rows per logits block of the reduced Triton path (a multiple of 16, at least 64)."""
    budget = REDUCED_WORKING_BYTES - (vocab * dim * 2 if compensated else 0)  # read at call time
    rows = max(MIN_ROW_BLOCK, budget // max(1, vocab * elem_size) // 16 * 16)
    return min(rows, n)


def _rows_config():
    """Launch options of ``_flce_rows_kernel``: one row per program, a 4096-wide tile (13 tiles
    per pass at V = 50257) and 16 warps, 8 logits per thread per tile: the kernel is bound by
    memory and a row block has only ~224 programs for 132 SMs, so each program keeps many loads
    in flight."""
    if triton_interpreting():
        return dict(BLOCK_R=16, BLOCK_V=128, num_warps=4)  # its cost is per program and op
    return dict(BLOCK_R=1, BLOCK_V=4096, num_warps=16)


def _dw_config():
    """Tiles of ``_flce_dw_kahan_kernel``: 128×64 dW tiles, a K step of 32 rows (a row block has
    ~224: 7 steps), 8 warps. Compiled for sm_90: 237 registers and no spills; 128×128 tiles
    spill ~1 KB per thread (the epilogue holds the fp32 accumulator, both 16-bit buffers and
    their 64-bit addresses: 7 registers per element), 64×64 at 8 warps takes 141 registers.
    The kernel is bound by its epilogue's traffic (8 bytes per dW element), not by its MMA.
    Not yet timed on a GPU."""
    if triton_interpreting():
        return dict(BLOCK_V=32, BLOCK_D=32, BLOCK_K=16, num_warps=4, num_stages=1)
    return dict(BLOCK_V=128, BLOCK_D=64, BLOCK_K=32, num_warps=8, num_stages=3)


def _launch_rows_kernel(z, dz, tgt, scale, loss, lse, arg, label_smoothing, z_loss, softcap, stats,
                        write_grad):
    """``dz`` is ``z`` itself or, for fp32 logits of 16-bit inputs, the 16-bit view of its
    memory that the gradient narrows into (see the kernel)."""
    cfg = _rows_config()
    n_rows, vocab = z.shape
    narrow = dz.dtype != z.dtype
    assert dz.data_ptr() == z.data_ptr() and dz.shape == z.shape
    assert not narrow or (z.dtype == torch.float32 and dz.stride(0) == 2 * z.stride(0))
    _flce_rows_kernel[(triton.cdiv(n_rows, cfg["BLOCK_R"]),)](
        z, dz, tgt, scale, loss, lse, arg,
        n_rows, vocab, z.stride(0), dz.stride(0), float(label_smoothing), float(z_loss),
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


@torch.no_grad()  # gradients by hand: no autograd graph, whoever calls it
def triton_forward_reduced(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing,
                           z_loss, need_hidden, need_weight, need_bias, softcap=0.0, stats=True,
                           row_block=None, fp32_logits=False):
    """``Σ_n row_scale_n·loss_n``, its lse (and argmax statistic when ``stats``) and, when asked,
    the gradients of hidden, weight and bias, from one row-chunked pass (Liger-Kernel's scheme;
    the backward only rescales the gradients by the upstream scalar).

    Per block of R rows (valid rows first, in ``_compact_rows`` order; no host sync):

    1. logits ``Z = H_b·Wᵀ (+ b)`` by a tensor-core GEMM (torch) into one reused [R, V] buffer
       in the input dtype;
    2. ``_flce_rows_kernel``: lse, loss (label smoothing, z-loss, softcap, the row scale =
       token weight) and dZ written over Z in place;
    3. ``dH_b = dZ·W`` by a GEMM, written once into its rows of dH (index_copy);
    4. dW += dZᵀ·H_b: an fp32 addmm for fp32 inputs, otherwise ``_flce_dw_kahan_kernel``
       (compensated 16-bit accumulation: dW's error stays that of one rounding however many
       blocks are added); db += Σ_rows dZ (an fp32 reduction reading dZ, no fp32 copy).

    Accounting at the target shape (N = 20480, D = 768, V = 50257, bf16, R = 224: 92 blocks):

    - FLOPs: 6·N·D·V = 4.74 TFLOP in GEMMs (2·N·D·V each for Z, dH, dW; 8·N·D·V before),
      ~6-11 elementwise FLOPs per logit in the row kernel.
    - HBM/L2 bytes per block: W read by the Z and dH GEMMs (2 × 77 MB), the block written,
      read twice and rewritten by the row kernel, and read by the dH and dW GEMMs (6 × 22.5 MB,
      mostly from L2), dW's sum and compensation read and written (8 × V·D = 309 MB): ~600 MB,
      ~55 GB per call, over half of it the Kahan epilogue (a plain bf16 accumulator would halve
      that part at 4.9× the error). The budget ``REDUCED_WORKING_BYTES`` trades memory for
      this traffic: W and dW are touched once per block.
    - launches per block: 2 GEMMs + the row kernel + the dW kernel (+ a gather of H_b, the
      index_copy of dH_b, the bias reduction): ~6, ~550 per call.
    - working memory: the [R, V] block (22.5 MB) + dW's bf16 compensation (77.2 MB, only when
      weight needs a 16-bit gradient) + per-row vectors: 99.7 MB. fp32 inputs: no compensation,
      R = 496 (99.7 MB of fp32 logits).

    ``fp32_logits`` (set under autocast, whose loss is fp32: the logits are then those of
    fp32 math on the cast inputs, as the contract of :mod:`unigen.kernels.common.autocast` says): the
    GEMM writes fp32 logits of the 16-bit operands and the row kernel narrows the gradient to
    16 bits in place, so dH and dW still run on 16-bit tensor cores; the block costs 4 bytes
    per logit instead of 2, so it has half the rows (112 at the target shape: 183 blocks).
    Without it a 16-bit input gets 16-bit logits, as PyTorch's own formula, whose loss is
    16-bit too.

    Rows with an ignored target sort to the end; the blocks they fill still run the GEMMs (the
    count of valid rows stays on the device) but get dZ = 0, and their rows of dH are zero.
    """
    n, dim = hidden.shape
    vocab = weight.shape[0]
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
    rows_per_block = row_block or _reduced_row_block(n, vocab, dim, logits_dtype.itemsize,
                                                     compensated)
    logits = torch.empty((min(rows_per_block, n), vocab), dtype=logits_dtype, device=dev)
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
        z = logits[:k]
        _logits_gemm(z, h, w_t, bias, upcast_cache)
        # the gradient's 16-bit view of the same memory when the logits are fp32 (narrowed)
        dz = logits.view(hidden.dtype)[:k, :vocab] if narrow else z
        _launch_rows_kernel(z, dz, tgt_c[start:], scale_c[start:], loss_c[start:], lse_c[start:],
                            arg_c[start:] if stats else arg_c, label_smoothing, z_loss, softcap,
                            stats, need_grad)
        if need_hidden:
            grad_h.index_copy_(0, idx, torch.mm(dz, weight))
        if need_weight:
            if compensated:
                _launch_dw_kahan(dz, h, grad_w, comp)
            else:
                torch.addmm(grad_w, dz.t(), h, out=grad_w)  # counted, as in the CPU path
        if need_bias:
            grad_b += dz.sum(dim=0, dtype=torch.float32)
    del logits
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


# ---------------------------------------------------------------------------------------------
# 4. torch.library custom ops: one opaque node for torch.compile, autograd attached
# ---------------------------------------------------------------------------------------------

_PY_IMPLS = ("torch", "triton")


def _forward_impl(impl):
    if impl not in _PY_IMPLS:
        raise ValueError(f"{OP}: unknown implementation {impl!r}")
    return triton_forward if impl == "triton" else reference_forward


def _backward_impl(impl):
    if impl not in _PY_IMPLS:
        raise ValueError(f"{OP}: unknown implementation {impl!r}")
    return triton_backward if impl == "triton" else reference_backward


# Every op body runs with autocast disabled: its matmuls must stay in the dtypes it chose (the
# autocast rule is applied once, at the entry of fused_linear_cross_entropy).
@torch.library.custom_op("unigen::flce_forward", mutates_args=())
def _flce_forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                     softcap: float, impl: str, stats: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        return _forward_impl(impl)(hidden, weight, bias, target, ignore_index, label_smoothing,
                                   z_loss, softcap, stats=stats)


@_flce_forward_op.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, impl,
      stats=True):
    n, acc = hidden.shape[0], _math_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(n if stats else 0, dtype=torch.bool))


@torch.library.custom_op("unigen::flce_backward", mutates_args=())
def _flce_backward_op(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None, target: torch.Tensor, lse: torch.Tensor,
                      ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                      impl: str, need_hidden: bool, need_weight: bool, need_bias: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        grads = _backward_impl(impl)(grad_rows, hidden, weight, bias, target, lse, ignore_index,
                                     label_smoothing, z_loss, need_hidden, need_weight, need_bias,
                                     softcap)
    # custom ops cannot return None: an unneeded gradient is an empty tensor
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_flce_backward_op.register_fake
def _(grad_rows, hidden, weight, bias, target, lse, ignore_index, label_smoothing, z_loss, softcap,
      impl, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    # shared by the Python op (…, z_loss, softcap, impl) and the C++ op (…, z_loss, softcap)
    hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap = inputs[:8]
    ctx.impl = inputs[8] if len(inputs) > 8 else "cpp"
    ctx.ignore_index, ctx.label_smoothing, ctx.z_loss = ignore_index, label_smoothing, z_loss
    ctx.softcap = softcap
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, output[1])


def _backward(ctx, grad_rows, _grad_lse, _grad_correct):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[2]
    n_inputs = len(ctx.needs_input_grad)  # 8 (the C++ op) or 10 (…, impl, stats)
    if not (need_h or need_w or need_b):
        return (None,) * n_inputs
    check_saved_storage(weight, "weight", op=OP)  # FSDP2 may have freed it (resharded)
    if bias is not None:
        check_saved_storage(bias, "bias", op=OP)
    if ctx.impl == "cpp":
        gh, gw, gb = torch.ops.unigen.fused_linear_cross_entropy_backward(
            grad_rows, hidden, weight, bias, target, lse, ctx.ignore_index, ctx.label_smoothing,
            ctx.z_loss, ctx.softcap, [need_h, need_w, need_b])
    else:
        gh, gw, gb = _flce_backward_op(grad_rows, hidden, weight, bias, target, lse,
                                       ctx.ignore_index, ctx.label_smoothing, ctx.z_loss,
                                       ctx.softcap, ctx.impl, need_h, need_w, need_b)
    grads = (gh if need_h else None, gw if need_w else None, gb if need_b else None)
    return grads + (None,) * (n_inputs - 3)


torch.library.register_autograd("unigen::flce_forward", _backward, setup_context=_setup_context)


def _forward_reduced_impl(impl):
    if impl not in _PY_IMPLS:
        raise ValueError(f"{OP}: unknown implementation {impl!r}")
    return triton_forward_reduced if impl == "triton" else reference_forward_reduced


@torch.library.custom_op("unigen::flce_forward_reduced", mutates_args=())
def _flce_forward_reduced_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             target: torch.Tensor, row_scale: torch.Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float, softcap: float, impl: str,
                             need_hidden: bool, need_weight: bool, need_bias: bool,
                             stats: bool = True, fp32_logits: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        out = _forward_reduced_impl(impl)(hidden, weight, bias, target, row_scale, ignore_index,
                                          label_smoothing, z_loss, need_hidden, need_weight,
                                          need_bias, softcap, stats=stats,
                                          fp32_logits=fp32_logits)
    return out[:3] + tuple(g if g is not None else hidden.new_empty(0) for g in out[3:])


def _fake_reduced(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss,
                  need_hidden, need_weight, need_bias, stats=True):
    n, acc = hidden.shape[0], _math_dtype(hidden.dtype)
    return (hidden.new_empty((), dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(n if stats else 0, dtype=torch.bool),
            torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0))


@_flce_forward_reduced_op.register_fake
def _(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, softcap, impl,
      need_hidden, need_weight, need_bias, stats=True, fp32_logits=False):
    return _fake_reduced(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing,
                         z_loss, need_hidden, need_weight, need_bias, stats)


def _setup_context_reduced(ctx, inputs, output):
    ctx.save_for_backward(*output[3:])


def _backward_reduced(ctx, grad_total, *_unused):
    # The gradients were computed in the forward. In eager mode they are scaled in place, so
    # autograd adopts them as .grad without a copy (saving their whole size at the peak); a
    # second backward through the same graph would then scale them twice, so it is refused.
    # While tracing (torch.compile, export: tensors are fake/functional subclasses) the graph
    # gets the out-of-place product instead, which the compiler may fuse as it likes.
    if getattr(ctx, "grads_consumed", False):
        raise RuntimeError(
            f"{OP}: backward ran twice through one reduced ('mean'/'sum') fused loss "
            f"(retain_graph=True); its gradients are computed in the forward and handed "
            f"over once. Compute the loss again, or use reduction='none' and reduce it.")
    gh, gw, gb = ctx.saved_tensors
    in_place = all(type(g) is torch.Tensor for g in (gh, gw, gb, grad_total))
    if in_place and torch.is_grad_enabled():
        # create_graph=True: the forward's gradients are constants here, so a gradient of them
        # (a double backward, a gradient penalty) would be silently wrong
        raise RuntimeError(
            f"{OP}: double backward (create_graph=True) is not supported through a reduced "
            f"('mean'/'sum') fused loss, whose gradients are computed in the forward; use "
            f"F.cross_entropy(F.linear(...)) for higher-order gradients.")
    ctx.grads_consumed = in_place

    def scale(g):
        if not g.numel():
            return None
        factor = grad_total.to(g.dtype)
        return g.mul_(factor) if in_place else g * factor

    n_nondiff = len(ctx.needs_input_grad) - 3
    return (scale(gh), scale(gw), scale(gb)) + (None,) * n_nondiff


torch.library.register_autograd("unigen::flce_forward_reduced", _backward_reduced,
                                setup_context=_setup_context_reduced)


def _register_cpp_op():
    """Fake kernels and autograd for the C++ op ``torch.ops.unigen.fused_linear_cross_entropy``."""
    @torch.library.register_fake("unigen::fused_linear_cross_entropy")
    def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap):
        n, acc = hidden.shape[0], _math_dtype(hidden.dtype)
        return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc),
                hidden.new_empty(n, dtype=torch.bool))

    @torch.library.register_fake("unigen::fused_linear_cross_entropy_backward")
    def _(grad_rows, hidden, weight, bias, target, lse, ignore_index, label_smoothing, z_loss,
          softcap, output_mask):
        return (torch.empty_like(hidden) if output_mask[0] else hidden.new_empty(0),
                torch.empty_like(weight) if output_mask[1] else hidden.new_empty(0),
                torch.empty_like(bias) if (output_mask[2] and bias is not None) else hidden.new_empty(0))

    torch.library.register_autograd("unigen::fused_linear_cross_entropy", _backward,
                                    setup_context=_setup_context)

    @torch.library.register_fake("unigen::fused_linear_cross_entropy_reduced")
    def _(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, softcap,
          output_mask):
        return _fake_reduced(hidden, weight, bias, target, row_scale, ignore_index,
                             label_smoothing, z_loss, *output_mask)

    torch.library.register_autograd("unigen::fused_linear_cross_entropy_reduced",
                                    _backward_reduced, setup_context=_setup_context_reduced)


if cpp_ops_available():
    _register_cpp_op()


# ---------------------------------------------------------------------------------------------
# 5. functional form and module
# ---------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, token_weights=None,
                               reduction="mean", backend="auto", return_stats=False, softcap=None):
    """Loss of ``F.cross_entropy(F.linear(hidden, weight, bias), target)`` without the N×V logits.

    Args:
        hidden: ``[..., D]`` activations (fp16, bf16, fp32; fp64 on the torch and C++ paths).
        weight: ``[V, D]`` output projection (same dtype as ``hidden``).
        target: ``[...]`` class indices in ``[0, V)`` or ``ignore_index``.
        bias: optional ``[V]``.
        ignore_index: rows with this target carry no loss and are dropped before any matmul.
        label_smoothing: ε of PyTorch's label smoothing (uniform over all V classes).
        z_loss: coefficient of ``lse²`` added to every row's loss (0 disables it).
        softcap: logit soft-cap c: the loss is that of ``c·tanh(logits/c)`` (Gemma 2's
            ``final_logit_softcapping``); None or 0 disables it.
        token_weights: optional ``[...]`` per-row weights multiplying each row's loss. With
            ``reduction="sum"`` weights ``coef_task / n_task`` give ``Σ_task coef_task·mean_task``;
            with ``"mean"`` the result is ``Σ w·loss / Σ w`` over non-ignored rows (PyTorch's
            weighted-mean convention).
        reduction: ``"mean"`` (0/0 = nan when every row is ignored, as PyTorch), ``"sum"``
            (0 when every row is ignored) or ``"none"`` (``[...]``, 0 on ignored rows).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"`` (see :mod:`unigen.kernels`).
        return_stats: also return :class:`CrossEntropyStats` (per-row lse and argmax-correctness,
            detached) for logging.

    Autocast: under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype (as
    the ``F.linear`` this op fuses would be), the math stays fp32 and the loss is fp32 (as
    autocast's ``F.cross_entropy``), on every backend and for every reduction.

    Returns:
        the loss in ``hidden``'s dtype (fp32 under autocast), and the stats when ``return_stats``.
    """
    cast_to = autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
    hidden, weight, bias = cast_inputs(cast_to, hidden, weight, bias)
    _check_inputs(hidden, weight, target, bias, token_weights, ignore_index, label_smoothing,
                  z_loss, reduction, softcap)
    cap = float(softcap or 0.0)
    impl = resolve_backend(backend, hidden.device, op=OP)
    if impl == "triton" and hidden.dtype == torch.float64:
        raise TypeError(f"{OP}: backend='triton' supports float16, bfloat16 and float32 inputs; "
                        f"use backend='torch' or 'cpp' for float64")
    lead_shape = target.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1)
    ls, zl = float(label_smoothing), float(z_loss)
    valid = t1 != ignore_index
    w = token_weights.reshape(-1) if token_weights is not None else None
    if reduction != "none" and (w is None or not w.requires_grad):
        # "mean"/"sum": one pass computes the loss and (if needed) its gradients.
        if backend == "auto" and impl == "cpp":
            # the PyTorch row-block path: ~660-row blocks, a transposed logits GEMM and the row
            # factors kept out of the [R, V] block beat the C++ op's ~80-row blocks (GPT-2 head,
            # N = 2048, fp32, 1 core: 5.63 s against 7.35 s, the naive formula 7.83 s; see
            # benchmarks/test_bench_cross_entropy.py::test_cross_entropy_gpt2_head_cpu)
            impl = "torch"
        grad_on = torch.is_grad_enabled()
        need = [grad_on and x is not None and x.requires_grad for x in (h2, weight, bias)]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        scale = w.to(acc) if w is not None else torch.ones(t1.shape[0], dtype=acc, device=h2.device)
        if impl == "cpp":
            total, lse, correct, *_ = torch.ops.unigen.fused_linear_cross_entropy_reduced(
                h2, weight, bias, t1, scale, ignore_index, ls, zl, cap, need)
        else:
            total, lse, correct, *_ = _flce_forward_reduced_op(
                h2, weight, bias, t1, scale, ignore_index, ls, zl, cap, impl, *need,
                stats=bool(return_stats), fp32_logits=cast_to is not None)
        loss = total if reduction == "sum" else _safe_mean(total, torch.where(valid, scale, 0.0).sum())
    else:
        if impl == "cpp":
            rows, lse, correct = torch.ops.unigen.fused_linear_cross_entropy(
                h2, weight, bias, t1, ignore_index, ls, zl, cap)
        else:
            rows, lse, correct = _flce_forward_op(h2, weight, bias, t1, ignore_index, ls, zl, cap, impl,
                                                  stats=bool(return_stats))
        if w is not None:
            rows = rows * w.to(rows.dtype)
        if reduction == "none":
            loss = rows.reshape(lead_shape)
        elif reduction == "sum":
            loss = rows.sum()
        else:
            denom = torch.where(valid, w.to(rows.dtype), 0.0).sum() if w is not None else valid.sum(dtype=rows.dtype)
            loss = _safe_mean(rows.sum(), denom)
    # under autocast the loss stays in the math dtype, as autocast's F.cross_entropy returns fp32
    loss = loss.to(hidden.dtype) if cast_to is None else loss
    if return_stats:
        return loss, CrossEntropyStats(lse.detach().reshape(lead_shape), correct.reshape(lead_shape))
    return loss


def _safe_mean(total, denom):
    """total / denom, nan when every row is ignored (PyTorch's convention) with zero gradients."""
    inv = torch.where(denom > 0, 1.0 / denom, 0.0)
    return torch.where(denom > 0, total * inv, torch.full_like(total, float("nan")))


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: a drop-in for
    ``nn.CrossEntropyLoss()(F.linear(hidden, weight, bias), target)``."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                 backend="auto", softcap=None):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.reduction = reduction
        self.backend = backend

    def forward(self, hidden, weight, target, bias=None, *, token_weights=None, return_stats=False):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, token_weights=token_weights,
            reduction=self.reduction, backend=self.backend, return_stats=return_stats,
            softcap=self.softcap)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
