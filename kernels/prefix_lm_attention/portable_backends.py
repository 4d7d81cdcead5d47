"""The portable backends of :func:`prefix_lm_attention`: SDPA on the padded batch (what
``backend="auto"`` runs on CPU, and on CUDA without triton), FlexAttention with the packed
prefix-LM block mask, and the flash-attn / PyTorch varlen kernels (prefix-LM as two calls).
flash-attn is optional and never imported at module import time.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .checks import OP
from .reference import key_ranges, sample_ids


def _padded_index(cu_seqlens, total_tokens: int, max_seqlen: int):
    """Index maps between packed [T] and padded [B, L] layouts, built on device without syncs.

    Returns (gather [B, L] int64 packed index of each padded slot, clamped in bounds;
    valid [B, L] bool; scatter [T] int64 flat padded index of each packed token).
    """
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    pos = torch.arange(max_seqlen, device=cu.device)
    lengths = cu[1:] - cu[:-1]
    valid = pos[None, :] < lengths[:, None]
    gather = (cu[:-1, None] + pos[None, :]).clamp_(0, max(total_tokens - 1, 0))
    sid = sample_ids(cu_seqlens, total_tokens).long()
    tok = torch.arange(total_tokens, device=cu.device)
    # clamped: with validate=False and a too small max_seqlen, wrong numbers but no bad index
    scatter = (sid * max_seqlen + (tok - cu[sid])).clamp_(0, max(B * max_seqlen - 1, 0))
    return gather, valid, scatter, B


def _sdpa_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, scale):
    """SDPA on the padded batch [B, H, L, D] with a boolean prefix-LM mask [B, 1, L, L]."""
    T, H, D = q.shape
    gather, valid, scatter, B = _padded_index(cu_seqlens, T, max_seqlen)
    L = max_seqlen

    def to_padded(x):
        x = x[gather.reshape(-1)].reshape(B, L, H, D)
        # zero the pad slots (they were filled from clamped indices) so no gradient leaks there
        x = torch.where(valid[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x.transpose(1, 2)

    pos = torch.arange(L, device=q.device)
    plen = prefix_lens.long()[:, None, None]
    qpos, kpos = pos[None, :, None], pos[None, None, :]
    # Pad query rows keep every real key (kpos <= qpos), so no row is fully masked (a fully masked
    # row is NaN in some SDPA kernels); their outputs are dropped and get zero gradient.
    allowed = ((kpos <= qpos) | ((kpos < plen) & (qpos < plen))) & valid[:, None, :]
    out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v),
                                         attn_mask=allowed[:, None], scale=scale)
    return out.transpose(1, 2).reshape(B * L, H, D)[scatter]


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # default dynamism: the packed token count changes every batch, and after the first
    # recompile dynamo marks it dynamic instead of compiling once per count
    return torch.compile(flex_attention)


def flex_block_mask(cu_seqlens, prefix_lens, total_tokens: int, *, block_size: int = 128):
    """FlexAttention BlockMask of the packed prefix-LM mask (built from the per-token ranges)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lo, hi = key_ranges(cu_seqlens, prefix_lens, total_tokens)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])

    # compiled mask construction on GPU: the eager path evaluates the mask_mod on all T x T pairs
    return create_block_mask(mask_mod, None, None, total_tokens, total_tokens,
                             device=cu_seqlens.device, BLOCK_SIZE=block_size,
                             _compile=cu_seqlens.is_cuda)


def _flex_forward(q, k, v, cu_seqlens, prefix_lens, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v)):
        raise NotImplementedError(f"{OP}: backend='flex' has no backward on CPU in PyTorch's "
                                  "FlexAttention; use backend='sdpa' (or run without grad)")
    T = q.shape[0]
    block_mask = flex_block_mask(cu_seqlens, prefix_lens, T)
    # On GPU FlexAttention is only fast compiled; on CPU the eager (unfused) path is exact and
    # avoids a compile per new shape.
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = fn(qh, kh, vh, block_mask=block_mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _load_flash_attn_varlen():
    """flash-attn is optional and never imported at module import time."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise RuntimeError(f"{OP}: backend='flash_attn' needs the flash-attn package "
                           f"(pip install flash-attn): {exc}") from exc
    return flash_attn_varlen_func


def _load_torch_varlen():
    """PyTorch's own flash varlen kernel (``torch.nn.attention.varlen``, CUDA, torch >= 2.10),
    adapted to flash_attn_varlen_func's calling convention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise RuntimeError(f"{OP}: backend='torch_varlen' needs torch.nn.attention.varlen "
                           f"(PyTorch >= 2.10): {exc}") from exc
    import inspect

    params = inspect.signature(varlen_attn).parameters

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        kwargs = {}
        if "window_size" in params:  # newer torch: causal = window (-1, 0)
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if "scale" in params:
            kwargs["scale"] = softmax_scale
        elif softmax_scale is not None and not math.isclose(softmax_scale, q.shape[-1] ** -0.5):
            raise ValueError(f"{OP}: this torch's varlen_attn has no scale argument; "
                             "backend='torch_varlen' needs softmax_scale = 1/sqrt(head_dim)")
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return varlen


def torch_varlen_available() -> bool:
    try:
        _load_torch_varlen()
        return torch.cuda.is_available()
    except RuntimeError:
        return False


def flash_attn_available() -> bool:
    try:
        _load_flash_attn_varlen()
        return True
    except RuntimeError:
        return False


def _flash_attn_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, scale, varlen_fn=None):
    """flash-attn varlen; prefix-LM as two calls.

    Text queries see every earlier key, prefix included: one causal call over whole samples
    gives them exactly (its prefix rows are discarded). Prefix queries see exactly the prefix
    keys of their sample: one non-causal call over the packed prefixes. Selecting the prefix
    tokens needs their count on the host: this backend syncs once per call.
    """
    fn = varlen_fn or _load_flash_attn_varlen()
    cu = cu_seqlens.to(torch.int32)
    out = fn(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    T = q.shape[0]
    sid = sample_ids(cu, T).long()
    pos = torch.arange(T, device=q.device) - cu.long()[sid]
    in_prefix = pos < prefix_lens.long()[sid]
    idx = torch.nonzero(in_prefix).squeeze(1)  # host sync (the output size)
    if idx.numel() == 0:
        return out
    cu_prefix = F.pad(torch.cumsum(prefix_lens.to(torch.int32), 0, dtype=torch.int32), (1, 0))
    max_prefix = max_seqlen  # an upper bound is all flash-attn needs
    out_prefix = fn(q[idx], k[idx], v[idx], cu_prefix, cu_prefix, max_prefix, max_prefix,
                    softmax_scale=scale, causal=False)
    return out.index_copy(0, idx, out_prefix)
