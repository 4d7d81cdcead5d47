"""Sequence packing for the decoder: many variable-length samples in one token dimension.

A micro-batch of decoder inputs (prefix: visual query tokens and/or XLM-R embeddings and the task
token; then the English target tokens) is ~75-115 tokens per sample, with very different lengths
per task. Padding to the longest wastes most of the work, so samples are concatenated along dim 0
(``values [T, ...]``) and described by ``cu_seqlens`` (int32 ``[B + 1]``: sample i spans
``cu_seqlens[i]:cu_seqlens[i+1]``) and ``prefix_lens`` (int32 ``[B]``). Attention then runs with
:func:`unigen.kernels.prefix_lm_attention`, positions restart at 0 in every sample, and the
next-token labels never cross a sample boundary nor target a prefix token.

Every helper validates its input and fails with a message naming the argument. The helpers that
read lengths on the host (``pack``, ``unpack``, ``padded_to_packed`` with tensor lengths, the value
checks) sync once on CUDA; ``packed_to_padded`` and ``next_token_labels`` build their indices on
the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from unigen.kernels.prefix_lm_attention import check_cu_seqlens, sample_ids
from unigen.kernels.prefix_lm_attention import prefix_lm_dense_mask as _dense_mask

__all__ = [
    "PackedBatch",
    "pack",
    "unpack",
    "packed_to_padded",
    "padded_to_packed",
    "next_token_labels",
    "prefix_lm_dense_mask",
]


@dataclass
class PackedBatch:
    """Samples concatenated along dim 0, with the metadata attention and the loss need."""

    values: torch.Tensor
    """``[T, ...]``: the samples concatenated along dim 0."""
    cu_seqlens: torch.Tensor
    """int32 ``[B + 1]``: ``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = T``."""
    prefix_lens: torch.Tensor
    """int32 ``[B]``: the prefix length of every sample (0 = plain causal)."""
    position_ids: torch.Tensor
    """int64 ``[T]``: position of every token inside its sample (restarts at 0)."""
    max_seqlen: int
    """Length of the longest sample (a Python int: the kernels take it without a sync)."""

    @property
    def batch_size(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def total_tokens(self) -> int:
        return self.values.shape[0]

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.values.to(device), self.cu_seqlens.to(device),
                           self.prefix_lens.to(device), self.position_ids.to(device),
                           self.max_seqlen)


def _lengths_list(lengths, name: str, op: str) -> list[int]:
    if isinstance(lengths, torch.Tensor):
        if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"{op}: {name} must be a 1-D integer tensor or a sequence of ints, "
                            f"got {lengths.dtype} of shape {tuple(lengths.shape)}")
        out = [int(x) for x in lengths.tolist()]
    else:
        try:
            out = [int(x) for x in lengths]
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{op}: {name} must be a sequence of ints or a 1-D integer tensor") from exc
        if any(isinstance(x, float) and not float(x).is_integer() for x in lengths):
            raise TypeError(f"{op}: {name} must hold integers, got {list(lengths)}")
    return out


def pack(seqs: Sequence[torch.Tensor], prefix_lens: Sequence[int] | torch.Tensor) -> PackedBatch:
    """Concatenate ``seqs`` (each ``[L_i, ...]``, same trailing shape, dtype and device).

    ``prefix_lens[i]`` (``0 <= prefix_lens[i] <= L_i``) is the prefix of sample i.
    """
    op = "pack"
    if isinstance(seqs, torch.Tensor) or not isinstance(seqs, Sequence):
        raise TypeError(f"{op}: seqs must be a list or tuple of tensors, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{op}: seqs is empty (a packed batch needs at least one sample)")
    first = seqs[0]
    for i, s in enumerate(seqs):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{op}: seqs[{i}] must be a torch.Tensor, got {type(s).__name__}")
        if s.dim() < 1:
            raise ValueError(f"{op}: seqs[{i}] must have a token dimension, got a 0-d tensor")
        if s.shape[1:] != first.shape[1:]:
            raise ValueError(f"{op}: seqs[{i}] has trailing shape {tuple(s.shape[1:])}, but seqs[0] "
                             f"has {tuple(first.shape[1:])}")
        if s.dtype != first.dtype:
            raise TypeError(f"{op}: seqs[{i}] has dtype {s.dtype}, but seqs[0] has {first.dtype}")
        if s.device != first.device:
            raise ValueError(f"{op}: seqs[{i}] is on {s.device}, but seqs[0] is on {first.device}")
    plens = _lengths_list(prefix_lens, "prefix_lens", op)
    if len(plens) != len(seqs):
        raise ValueError(f"{op}: prefix_lens has {len(plens)} entries for {len(seqs)} sequences")
    lengths = [s.shape[0] for s in seqs]
    for i, (p, n) in enumerate(zip(plens, lengths)):
        if not 0 <= p <= n:
            raise ValueError(f"{op}: prefix_lens[{i}] = {p} must lie in [0, length of seqs[{i}] = {n}]")
    device = first.device
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
    position_ids = torch.cat([torch.arange(n, dtype=torch.int64, device=device) for n in lengths])
    return PackedBatch(
        values=torch.cat(list(seqs), dim=0),
        cu_seqlens=cu_seqlens,
        prefix_lens=torch.tensor(plens, dtype=torch.int32, device=device),
        position_ids=position_ids,
        max_seqlen=max(lengths),
    )


def _check_cu(cu_seqlens, total: int, op: str, device=None, max_seqlen=None):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{op}: cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    # the sample-structure checks are the op's; an all-zero prefix_lens makes them check cu only
    no_prefix = torch.zeros(max(cu_seqlens.numel() - 1, 0), dtype=torch.int32,
                            device=cu_seqlens.device)
    check_cu_seqlens(cu_seqlens, no_prefix, total, op=op, device=device, max_seqlen=max_seqlen)


def unpack(values: torch.Tensor, cu_seqlens: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of :func:`pack`: views ``values[cu_seqlens[i]:cu_seqlens[i+1]]``."""
    op = "unpack"
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise TypeError(f"{op}: values must be a tensor with a token dimension")
    _check_cu(cu_seqlens, values.shape[0], op)
    cu = cu_seqlens.tolist()
    return [values[a:b] for a, b in zip(cu[:-1], cu[1:])]


def packed_to_padded(values, cu_seqlens, max_seqlen, pad_value=0.0):
    """``values [T, ...]`` → (``padded [B, max_seqlen, ...]``, bool ``mask [B, max_seqlen]``).

    ``mask`` is True on real tokens. Differentiable (a gather); the indices are built on the
    device.
    """
    op = "packed_to_padded"
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise TypeError(f"{op}: values must be a tensor with a token dimension")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{op}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    T = values.shape[0]
    _check_cu(cu_seqlens, T, op, device=values.device, max_seqlen=max_seqlen)
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    pos = torch.arange(max_seqlen, device=values.device)
    mask = pos[None, :] < (cu[1:] - cu[:-1])[:, None]
    index = (cu[:-1, None] + pos[None, :]).clamp_(0, max(T - 1, 0))
    if T == 0:
        padded = values.new_full((B, max_seqlen) + tuple(values.shape[1:]), pad_value)
        return padded, mask
    gathered = values[index.reshape(-1)].reshape((B, max_seqlen) + tuple(values.shape[1:]))
    m = mask.reshape(mask.shape + (1,) * (values.dim() - 1))
    padded = torch.where(m, gathered, torch.as_tensor(pad_value, dtype=values.dtype,
                                                      device=values.device))
    return padded, mask


def padded_to_packed(padded, lengths) -> torch.Tensor:
    """``padded [B, L, ...]`` and the per-sample ``lengths`` (ints or a tensor) → ``[T, ...]``."""
    op = "padded_to_packed"
    if not isinstance(padded, torch.Tensor) or padded.dim() < 2:
        raise TypeError(f"{op}: padded must be a tensor [B, L, ...]")
    B, L = padded.shape[:2]
    lens = _lengths_list(lengths, "lengths", op)
    if len(lens) != B:
        raise ValueError(f"{op}: lengths has {len(lens)} entries, padded has batch size {B}")
    for i, n in enumerate(lens):
        if not 0 <= n <= L:
            raise ValueError(f"{op}: lengths[{i}] = {n} must lie in [0, padded.shape[1] = {L}]")
    index = torch.cat([torch.arange(n, dtype=torch.int64) + i * L for i, n in enumerate(lens)]) \
        if lens else torch.zeros(0, dtype=torch.int64)
    return padded.reshape((B * L,) + tuple(padded.shape[2:]))[index.to(padded.device)]


def next_token_labels(token_ids: torch.Tensor, cu_seqlens, prefix_lens,
                      ignore_index: int = -100) -> torch.Tensor:
    """Packed next-token targets: int64 ``[T]``.

    ``labels[t] = token_ids[t + 1]`` when ``t + 1`` is in the same sample as ``t`` and is a text
    token (position ``>= prefix_lens`` of that sample); ``ignore_index`` otherwise (the last
    token of every sample, and every position whose next token is still in the prefix).
    """
    op = "next_token_labels"
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"{op}: token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise TypeError(f"{op}: token_ids must be a packed 1-D integer tensor [T], got "
                        f"{token_ids.dtype} of shape {tuple(token_ids.shape)}")
    T = token_ids.shape[0]
    check_cu_seqlens(cu_seqlens, prefix_lens, T, op=op, device=token_ids.device)
    sid = sample_ids(cu_seqlens, T).long()
    pos = torch.arange(T, device=token_ids.device) - cu_seqlens.long()[sid]
    end = cu_seqlens.long()[sid + 1]
    nxt = torch.arange(1, T + 1, device=token_ids.device)
    # the next token must exist in this sample and be a text token
    keep = (nxt < end) & (pos + 1 >= prefix_lens.long()[sid])
    shifted = torch.roll(token_ids.long(), -1) if T else token_ids.long()
    return torch.where(keep, shifted, torch.full_like(shifted, ignore_index))


def prefix_lm_dense_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                         total_tokens: int) -> torch.Tensor:
    """bool ``[T, T]``, True where packed token t may attend packed token s.

    The same function the attention reference uses: same sample, and ``s <= t`` or both in the
    prefix. O(T^2) memory: for tests and the padded/dense baselines on small batches.
    """
    if isinstance(total_tokens, bool) or not isinstance(total_tokens, int) or total_tokens < 0:
        raise TypeError(f"prefix_lm_dense_mask: total_tokens must be a non-negative Python int, "
                        f"got {total_tokens!r}")
    return _dense_mask(cu_seqlens, prefix_lens, total_tokens)
