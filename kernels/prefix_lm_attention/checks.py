"""Validation of the packed layout of :func:`prefix_lm_attention`: the shapes and values of
(``cu_seqlens``, ``prefix_lens``) against the packed token count and ``max_seqlen``, with a clear
error (the value checks read the tensors on the host)."""

from __future__ import annotations

import torch

from ..common.checks import INDEX_DTYPES, check_tensor

OP = "prefix_lm_attention"


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def check_cu_seqlens(cu_seqlens, prefix_lens, total_tokens: int, *, op: str = OP, max_seqlen=None,
                     device=None):
    """Check the shapes and the values of (``cu_seqlens``, ``prefix_lens``); raise a clear error.

    The value checks read the tensors on the host (one transfer on CUDA, free on CPU).
    """
    check_tensor(cu_seqlens, "cu_seqlens", op=op, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_tensor(prefix_lens, "prefix_lens", op=op, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold at least 2 values (batch of >= 1 sample), "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if prefix_lens.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"{op}: prefix_lens must have one value per sample (len(cu_seqlens) - 1 = "
                         f"{cu_seqlens.numel() - 1}), got shape {tuple(prefix_lens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    pl = prefix_lens.detach().to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0:
        raise ValueError(f"{op}: cu_seqlens[0] must be 0, got {int(cu[0])}")
    if int(cu[-1]) != total_tokens:
        raise ValueError(f"{op}: cu_seqlens[-1] must equal total_tokens = {total_tokens} (the first "
                         f"dimension of the packed tensors), got {int(cu[-1])}")
    if bool((lengths < 0).any()):
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}] = "
                         f"{int(cu[i + 1])} < cu_seqlens[{i}] = {int(cu[i])}")
    bad = (pl < 0) | (pl > lengths)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{op}: prefix_lens[{i}] = {int(pl[i])} must lie in [0, length of sample "
                         f"{i} = {int(lengths[i])}]")
    if max_seqlen is not None and lengths.numel() and int(lengths.max()) > max_seqlen:
        i = int(torch.argmax(lengths))
        raise ValueError(f"{op}: max_seqlen = {max_seqlen} is smaller than the length of sample "
                         f"{i} ({int(lengths[i])})")
