"""The readable PyTorch reference of the fused cross-entropy (fp32 math, fp64 for fp64 inputs),
vocabulary-chunked so that it never holds more than [rows, chunk] logits.

It is what the tests trust, the ``reduction="none"`` path on CPU (and ``backend="torch"``
anywhere), and where the per-row pieces shared by the PyTorch paths live (the valid rows, the
math dtype, the soft-cap and its slope).
"""

from __future__ import annotations

import math

import torch

# Transient logits blocks of the CPU paths stay near this size (the C++ op uses the same).
BLOCK_BUDGET_BYTES = 32 * 2**20


def _vocab_chunk(rows, vocab, elem_size=4):
    """Vocabulary columns per [rows, chunk] logits block (a multiple of 256, at least 256)."""
    cols = BLOCK_BUDGET_BYTES // max(1, rows * elem_size)
    return min(vocab, max(256, cols // 256 * 256))


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
