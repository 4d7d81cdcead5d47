"""The definition of the packed prefix-LM mask and the readable reference of the attention.

Per-token sample ids and key ranges (the contiguous range of keys each query may attend, which
the tiled kernels and FlexAttention's block mask use), the dense [T, T] mask written from the
definition instead (so that the tests check the shortcut too), and the dense-mask PyTorch
reference (fp32 math, differentiable by autograd; ``backend="torch"``).
"""

from __future__ import annotations

import math

import torch

from .checks import check_cu_seqlens


def sample_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int32 [T]: the sample each packed token belongs to (no host sync: a device searchsorted)."""
    cu = cu_seqlens.to(torch.int32)
    tok = torch.arange(total_tokens, device=cu.device, dtype=torch.int32)
    sid = torch.searchsorted(cu, tok, right=True) - 1
    # Clamping keeps every later gather in bounds even for invalid cu_seqlens (validate=False).
    return sid.clamp_(0, max(cu.numel() - 2, 0)).to(torch.int32)


def key_ranges(cu_seqlens, prefix_lens, total_tokens: int):
    """Per query token t: the contiguous key range ``[lo[t], hi[t])`` it may attend (int64 [T])."""
    sid = sample_ids(cu_seqlens, total_tokens).long()
    start = cu_seqlens.long()[sid]
    t = torch.arange(total_tokens, device=cu_seqlens.device)
    hi = torch.maximum(t + 1, start + prefix_lens.long()[sid])
    return start, hi

def prefix_lm_dense_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                         total_tokens: int) -> torch.Tensor:
    """bool [T, T]: ``mask[t, s]`` is True when packed token t may attend packed token s.

    Written from the definition (same sample, and causal or both-in-prefix), not from the
    contiguous-range shortcut the kernels use, so that the tests check the shortcut too.
    """
    check_cu_seqlens(cu_seqlens, prefix_lens, total_tokens, op="prefix_lm_dense_mask")
    sid = sample_ids(cu_seqlens, total_tokens).long()
    pos = torch.arange(total_tokens, device=cu_seqlens.device) - cu_seqlens.long()[sid]
    in_prefix = pos < prefix_lens.long()[sid]
    same_sample = sid[:, None] == sid[None, :]
    causal = pos[None, :] <= pos[:, None]
    both_prefix = in_prefix[:, None] & in_prefix[None, :]
    return same_sample & (causal | both_prefix)


def prefix_lm_attention_reference(q, k, v, cu_seqlens, prefix_lens, softmax_scale=None):
    """The readable reference: fp32 softmax(q k^T * scale + mask) v with the dense [T, T] mask.

    O(heads * T^2) memory: meant for tests and small inputs. Differentiable by autograd.
    """
    T, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    mask = prefix_lm_dense_mask(cu_seqlens, prefix_lens, T)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("thd,shd->hts", q.to(compute), k.to(compute)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", probs, v.to(compute))
    return out.to(q.dtype)
