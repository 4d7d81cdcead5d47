"""The vocabulary-parallel fused cross-entropy: each rank of a group holds a slice of the head's
vocabulary (rows ``[start, start + V_r)`` of W and b, in rank order) and the same hidden rows
and targets; no rank holds the full weight or any full row of logits.

Per block of rows, each rank forms its ``[R, V_r]`` logits (soft-capped), reduces them to four
numbers per row — its log-sum-exp, its part of the target logit (non-zero only on the rank that
owns the target), its sum of logits (for label smoothing) and its best logit with that logit's
global index — and the group all-gathers those ``[R, 5]`` blocks. Every rank then combines them
the same way: ``lse = logsumexp_r(lse_r)``, ``z_t = Σ_r z_t,r``, ``Σz = Σ_r Σz_r``, the argmax
from the rank with the largest best logit (the lowest index on ties, as ``torch.argmax``), so
the row losses are those of the unsharded op:

    loss_n = lse - (1-ε)·z_t - (ε/V)·Σ_j z_j + z_loss·lse²

and so is the logits' gradient on each rank's slice (``_logit_grad_chunk`` with the global lse
and V). Its GEMMs give this rank's rows of dW and db exactly, and a partial dH; one all-reduce
of ``[N, D]`` sums the partials into every rank's dH (which the unsharded op returns whole).

Communication per call (P ranks, N rows that carry a loss, D the hidden size):
- ``reduction="mean"``/``"sum"`` (one pass: loss and gradients in the forward): one all-gather of
  ``P·R·5`` fp64 values per block of R rows (``P·N·40`` bytes in all), and, when ``hidden``
  needs a gradient, one all-reduce of the ``[N, D]`` gradient in the math dtype;
- ``"none"``: the same all-gathers in the forward, and in the backward the dH all-reduce only
  (the logits are recomputed with the saved global lse; the slices need nothing else);
- with a ``process_group`` (not a DTensor) one more all-gather of the P slice sizes per call.
No weight, logits or gradient of the weight crosses the group.

Every rank must call with the same rows, targets, token weights and options (a tensor-parallel
group does: its hidden states are replicated); the blocks of rows line up because the block size
is computed from the global vocabulary. The math is PyTorch on any device (the GEMMs are the
device's BLAS); the FLOPs per rank are those of the unsharded op over V/P.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from .checks import OP
from .cpu import _reduced_row_chunk
from .reference import _apply_softcap, _logit_grad_chunk, _math_dtype, _softcap_slope, _valid_rows

_STATS = 5  # lse, target logit, Σ logits, best logit, its global index (per row and rank)


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """This rank's vocabulary slice ``[start, start + V_r)`` of ``total`` classes, over a group."""

    group_name: str
    start: int
    total: int
    world: int


def _group(group_name):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _gather_stats(block, group):
    """``[P, R, 5]``: every rank's per-row statistics, in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = block.new_empty((world * block.shape[0],) + tuple(block.shape[1:]))
    _all_gather_single(out, block.contiguous(), group)
    return out.view((world,) + tuple(block.shape))


def _block_stats(z, t, start, label_smoothing, stats):
    """This rank's ``[R, 5]`` statistics of a ``[R, V_r]`` block of (capped) logits."""
    rows, width = z.shape
    out = torch.zeros(rows, _STATS, dtype=torch.float64, device=z.device)
    if width == 0:  # an empty slice (more ranks than a torch.chunk split fills)
        out[:, 0] = -math.inf
        out[:, 3] = -math.inf
        return out
    z_max = z.amax(dim=1)
    out[:, 0] = z_max + torch.log(torch.exp(z - z_max[:, None]).sum(dim=1))
    in_slice = (t >= start) & (t < start + width)
    local = (t - start).clamp(0, width - 1)
    out[:, 1] = torch.where(in_slice, z.gather(1, local[:, None]).squeeze(1), 0.0)
    if label_smoothing > 0.0:
        out[:, 2] = z.sum(dim=1)
    if stats:
        best, where = z.max(dim=1)
        out[:, 3] = best
        out[:, 4] = (where + start).to(torch.float64)  # exact below 2**53 classes
    return out


def _combine(gathered, t, vocab, label_smoothing, z_loss, stats, acc):
    """Row losses, global lse and argmax-correctness from the gathered ``[P, R, 5]``."""
    lse = torch.logsumexp(gathered[..., 0], dim=0)
    z_t = gathered[..., 1].sum(dim=0)
    loss = lse - (1.0 - label_smoothing) * z_t
    if label_smoothing > 0.0:
        loss = loss - (label_smoothing / vocab) * gathered[..., 2].sum(dim=0)
    if z_loss > 0.0:
        loss = loss + z_loss * lse * lse
    correct = None
    if stats:
        winner = gathered[..., 3].argmax(dim=0)  # the first maximum: the lowest rank, lowest index
        best = gathered[..., 4].gather(0, winner[None]).squeeze(0)
        correct = best.long() == t
    return loss.to(acc), lse.to(acc), correct


def _logits(h, w, b, softcap):
    z = torch.addmm(b, h, w.t()) if b is not None else h @ w.t()
    return _apply_softcap(z, softcap)


def _logit_grad(z, lse, t, start, g, label_smoothing, z_loss, vocab, softcap):
    """∂loss/∂z on this rank's slice (overwrites z), the soft-cap's slope included."""
    width = z.shape[1]
    slope = _softcap_slope(z, softcap) if softcap > 0.0 else None
    in_slice = (t >= start) & (t < start + width)
    local = (t - start).clamp(0, width - 1)
    dz = _logit_grad_chunk(z, lse, local, in_slice, g, label_smoothing, z_loss, vocab)
    return dz.mul_(slope) if slope is not None else dz


def _all_gather_single(out, x, group):
    import torch.distributed as dist

    # torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def _all_reduce(x, group):
    import torch.distributed as dist

    dist.all_reduce(x, group=group)
    return x


def _row_chunk(n_rows, shard, acc):
    # from the global vocabulary, so that every rank cuts its rows into the same blocks
    return _reduced_row_chunk(n_rows, math.ceil(shard.total / shard.world), torch.finfo(acc).bits // 8)


@torch.no_grad()
def vocab_parallel_forward(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                           softcap, shard: VocabShard, stats=True, row_scale=None,
                           need_hidden=False, need_weight=False, need_bias=False):
    """Row losses, the global lse and argmax-correctness of every row (0 on ignored rows); with
    ``row_scale`` also ``Σ_n row_scale_n·loss_n`` and its gradients (one pass, as the reduced
    CPU path): returns ``(rows, lse, correct, total, grad_h, grad_w, grad_b)``."""
    group = _group(shard.group_name)
    n, width = target.shape[0], weight.shape[0]
    acc = _math_dtype(hidden.dtype)
    rows_out = hidden.new_zeros(n, dtype=acc)
    lse_out = hidden.new_zeros(n, dtype=acc)
    correct = torch.zeros(n if stats else 0, dtype=torch.bool, device=hidden.device)
    total = hidden.new_zeros((), dtype=acc)
    reduced = row_scale is not None
    grad_h = torch.zeros_like(hidden, dtype=acc) if reduced and need_hidden else None
    grad_w = torch.zeros_like(weight, dtype=acc) if reduced and need_weight else None
    grad_b = torch.zeros(width, dtype=acc, device=weight.device) if reduced and need_bias else None
    need_grad = reduced and (need_hidden or need_weight or need_bias)
    valid = _valid_rows(target, ignore_index)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    step = _row_chunk(valid.numel(), shard, acc)
    for begin in range(0, valid.numel(), step):
        r = valid[begin:begin + step]
        h = hidden.index_select(0, r).to(acc)
        t = target.index_select(0, r).long()
        z = _logits(h, w, b, softcap)
        gathered = _gather_stats(_block_stats(z, t, shard.start, label_smoothing, stats), group)
        loss, lse, ok = _combine(gathered, t, shard.total, label_smoothing, z_loss, stats, acc)
        rows_out[r], lse_out[r] = loss, lse
        if stats:
            correct[r] = ok
        if not reduced:
            continue
        scale = row_scale.index_select(0, r).to(acc)
        total += (scale * loss).sum()
        if not need_grad or width == 0:
            continue
        dz = _logit_grad(z, lse, t, shard.start, scale, label_smoothing, z_loss, shard.total, softcap)
        _apply_logit_grad(dz, r, h, w, grad_h, grad_w, grad_b)
    return (rows_out, lse_out, correct, total) + _finish_grads(grad_h, grad_w, grad_b, hidden, weight, bias, group)


def _apply_logit_grad(dz, rows, h, w, grad_h, grad_w, grad_b):
    """This slice's GEMMs: its part of dH (rows ``rows``), its rows of dW and db."""
    if grad_h is not None:
        grad_h.index_copy_(0, rows, dz @ w)
    if grad_w is not None:
        torch.addmm(grad_w, dz.t(), h, out=grad_w)
    if grad_b is not None:
        grad_b += dz.sum(dim=0)


def _finish_grads(grad_h, grad_w, grad_b, hidden, weight, bias, group):
    if grad_h is not None:
        _all_reduce(grad_h, group)  # every slice's part of dH: the whole dH on every rank
    return (grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None)


@torch.no_grad()
def vocab_parallel_backward(grad_rows, hidden, weight, bias, target, lse, ignore_index,
                            label_smoothing, z_loss, softcap, shard: VocabShard, need_hidden,
                            need_weight, need_bias):
    """Gradients for ``reduction="none"``: the logits recomputed with the saved global lse."""
    group = _group(shard.group_name)
    width = weight.shape[0]
    acc = _math_dtype(hidden.dtype)
    grad_h = torch.zeros_like(hidden, dtype=acc) if need_hidden else None
    grad_w = torch.zeros_like(weight, dtype=acc) if need_weight else None
    grad_b = torch.zeros(width, dtype=acc, device=weight.device) if need_bias else None
    valid = _valid_rows(target, ignore_index)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    step = _row_chunk(valid.numel(), shard, acc)
    for begin in range(0, valid.numel() if width else 0, step):
        r = valid[begin:begin + step]
        h = hidden.index_select(0, r).to(acc)
        t = target.index_select(0, r).long()
        z = _logits(h, w, b, softcap)
        dz = _logit_grad(z, lse.index_select(0, r).to(acc), t, shard.start,
                         grad_rows.index_select(0, r).to(acc), label_smoothing, z_loss, shard.total, softcap)
        _apply_logit_grad(dz, r, h, w, grad_h, grad_w, grad_b)
    return _finish_grads(grad_h, grad_w, grad_b, hidden, weight, bias, group)


# ---------------------------------------------------------------------------------------------
# the user's setup: DTensor inputs or a process group, turned into local tensors and a shard
# ---------------------------------------------------------------------------------------------


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support
        return None
    return DTensor


def has_dtensor(*tensors) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and any(isinstance(x, dtensor) for x in tensors)


def _placements_text(x):
    return f"{type(x).__name__}({', '.join(str(p) for p in x.placements)}) on {x.device_mesh}"


def resolve_sharding(hidden, weight, bias, target, token_weights, process_group):
    """``(hidden, weight, bias, target, token_weights, shard)`` as local tensors, and this
    rank's :class:`VocabShard` (None when nothing is split along the vocabulary).

    - ``weight`` a DTensor: ``Shard(0)`` on one mesh dimension (ColwiseParallel's layout of a
      head) is that dimension's vocabulary split, ``Replicate`` elsewhere; ``hidden`` must then
      be a DTensor on the same mesh, ``Replicate`` on that dimension (a tensor-parallel plan's
      input hook makes it so) — a plain ``hidden`` is refused, since it cannot say whether the
      ranks hold the same rows (vocabulary parallelism) or different ones (FSDP2's sharded
      parameter read outside the module's forward). A fully replicated weight is just local.
    - ``process_group`` with plain tensors (Megatron style): ``weight`` (and ``bias``) is this
      rank's contiguous slice of the vocabulary, in rank order; the slices may differ in size.
    Gradients flow back through ``to_local`` with each input's own placements.
    """
    dtensor = _dtensor_type()
    shard = None
    if dtensor is not None and isinstance(weight, dtensor):
        if process_group is not None:
            raise ValueError(f"{OP}: pass either a DTensor weight or process_group, not both "
                             f"(the DTensor's mesh names the group)")
        shard, weight_local = _weight_shard(weight)
        if bias is not None:
            if not isinstance(bias, dtensor) or tuple(bias.placements) != tuple(weight.placements):
                raise ValueError(f"{OP}: bias must be a DTensor placed like weight "
                                 f"({_placements_text(weight)}), got "
                                 f"{_placements_text(bias) if isinstance(bias, dtensor) else 'a plain tensor'}")
            bias = bias.to_local()
        hidden = _local_rows(hidden, "hidden", weight, shard, dtensor)
        weight = weight_local
    elif process_group is not None:
        shard = _group_shard(weight, process_group)
        if isinstance(bias, dtensor or ()) or isinstance(hidden, dtensor or ()):
            raise ValueError(f"{OP}: with process_group, pass plain (local) tensors, not DTensors")
    else:
        if isinstance(bias, dtensor):
            raise ValueError(f"{OP}: bias is a DTensor but weight is not")
        hidden = _local_rows(hidden, "hidden", None, None, dtensor)
    target = _local_rows(target, "target", None, None, dtensor)
    if token_weights is not None:
        token_weights = _local_rows(token_weights, "token_weights", None, None, dtensor)
    return hidden, weight, bias, target, token_weights, shard


def _weight_shard(weight):
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = weight.device_mesh, tuple(weight.placements)
    vocab_dims = [i for i, p in enumerate(placements) if isinstance(p, Shard) and p.dim == 0]
    odd = [p for p in placements if not (isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0))]
    if odd or len(vocab_dims) > 1:
        raise ValueError(
            f"{OP}: weight is {_placements_text(weight)}; supported: Shard(0) (the vocabulary split, "
            f"ColwiseParallel's layout) on at most one mesh dimension and Replicate elsewhere. A head "
            f"sharded along D (Shard(1), RowwiseParallel) yields partial logits: shard it along the "
            f"vocabulary instead")
    local = weight.to_local()
    if not vocab_dims or mesh.size(vocab_dims[0]) == 1:
        return None, local
    dim = vocab_dims[0]
    world, coord = mesh.size(dim), mesh.get_local_rank(dim)
    vocab = weight.shape[0]
    chunk = math.ceil(vocab / world)  # torch.chunk's split, as DTensor's Shard
    start = min(coord * chunk, vocab)
    if local.shape[0] != max(0, min(chunk, vocab - start)):
        raise ValueError(f"{OP}: weight's local slice has {local.shape[0]} rows where Shard(0) of "
                         f"{vocab} over {world} ranks gives rank {coord} {max(0, min(chunk, vocab - start))}")
    return VocabShard(mesh.get_group(dim).group_name, start, vocab, world), local


def _group_shard(weight, group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{OP}: process_group given but torch.distributed is not initialised")
    if isinstance(group, str):
        group = _group(group)
    if dist.get_world_size(group) == 1:
        return None
    sizes = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    every = sizes.new_empty(dist.get_world_size(group))
    _all_gather_single(every, sizes, group)
    every = every.tolist()  # the slices' sizes: a host read (one per call)
    rank = dist.get_rank(group)
    return VocabShard(group.group_name, int(sum(every[:rank])), int(sum(every)), len(every))


def _local_rows(x, name, weight, shard, dtensor):
    """The local tensor of a DTensor input that is replicated (or split by rows) across the
    vocabulary's mesh dimension; plain tensors as they are (refused beside a vocabulary-sharded
    DTensor weight, whose ranks must be told to hold the same rows)."""
    if dtensor is None or not isinstance(x, dtensor):
        if shard is not None and name == "hidden":
            raise ValueError(
                f"{OP}: weight is {_placements_text(weight)} (sharded along the vocabulary) but hidden is a "
                f"plain tensor. For vocabulary (tensor) parallelism pass hidden as a DTensor, Replicate on "
                f"that mesh dimension (DTensor.from_local(hidden, mesh, [Replicate()])), as ColwiseParallel's "
                f"input hook does; for FSDP2's sharded parameter call the loss inside the module's forward "
                f"(or unshard() it first), where FSDP2 has all-gathered it")
        return x
    from torch.distributed.tensor import Partial, Shard

    for i, p in enumerate(x.placements):
        if isinstance(p, Partial) or (isinstance(p, Shard) and p.dim >= x.dim() - (name == "hidden")):
            raise ValueError(f"{OP}: {name} is {_placements_text(x)}; it must be replicated, or split by "
                             f"rows only")
        if shard is not None and isinstance(p, Shard) and x.device_mesh.get_group(i).group_name == shard.group_name:
            raise ValueError(f"{OP}: {name} is {_placements_text(x)}, split along the mesh dimension the "
                             f"vocabulary is split on; it must be Replicate there")
    return x.to_local()
