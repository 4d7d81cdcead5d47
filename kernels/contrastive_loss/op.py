"""Registration of the fused contrastive loss.

- ``_forward_impl`` / ``_backward_impl``: the op on a gathered batch, on the Triton launchers or
  the dense PyTorch path;
- the ``torch.library`` custom ops ``unigen::contrastive_loss_fwd`` and
  ``unigen::contrastive_loss_bwd`` (one opaque node each for torch.compile, with fake kernels and
  autograd) and ``_ContrastiveLossFunction``, the same for eager mode without the dispatcher;
- the distributed gathers, the functional form :func:`contrastive_loss` (argument checking, then
  the op) and the module :class:`ContrastiveLoss`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..common.autocast import autocast_dtype, autocast_free, cast_inputs
from ..common.backend import resolve_backend
from ..common.checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, resolve_validate
from .cpu import (
    _check_prep_flags,
    _combine_distributed,
    _torch_grad_logits,
    _torch_prep,
    _torch_rows_fwd,
)
from .launch import _TRITON_MAX_DIM, _triton_bwd, _triton_fwd, _triton_prep
from .reference import _OP, ContrastiveLossOutput, _acc_dtype

# ``negatives=`` -> the kernels' MODE (0: no mining, 1: sampled, 2: hardest)
_NEGATIVE_MODES = {None: 0, "sample": 1, "hardest": 2}


# ----------------------------------------------------------------------------------------------
# The op: implementations, torch.library custom ops (torch.compile), autograd.Function (eager)
# ----------------------------------------------------------------------------------------------


@autocast_free  # the op's own dtype rules hold under autocast (its rule is applied at entry)
def _forward_impl(image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                  label_smoothing, mode, backend, normalize=True, validate=True):
    """Returns (loss, negatives [2, n_local], lse [2, n_local], pos_cnt [2, n_local], inv [2, N]).

    ``image``/``text`` are the gathered [N, D] features, the local rows are
    ``row_start:row_start + n_local``; row 0 of the [2, n_local] outputs is the image→text
    direction, row 1 text→image. lse, pos_cnt and the inverse norms are what the backward
    recomputes the tiles from. ``ids`` None: pair i is the only positive of i. ``normalize``
    False: raw dot products (inv = 1, the prep pass still checks the features are finite).
    ``validate`` False: the prep pass's flags are not checked (non-finite features then give a
    non-finite loss; the mined indices stay in [-1, N))."""
    n = image.shape[0]
    keep, smooth = 1.0 - label_smoothing, label_smoothing / n
    if backend == "triton":
        image, text = image.contiguous(), text.contiguous()
        inv, ok, blocks = _triton_prep(image, text, logit_scale)
        if not normalize:
            inv = torch.ones_like(inv)
        loss, neg, lse, pos_cnt, flag = _triton_fwd(image, text, inv, ids, logit_scale, seeds,
                                                    row_start, n_local, keep, smooth, mode, ok)
        # after the sweep: its finish kernel reduces the flags (on bad input the outputs are
        # garbage that never reaches the caller: CPU raises, CUDA's assertion fails the stream)
        if validate:
            _check_prep_flags(ok, blocks, logit_scale, flag)
        return loss, neg, lse, pos_cnt, inv
    inv, ok, blocks = _torch_prep(image, text, logit_scale)
    if validate:
        _check_prep_flags(ok, blocks, logit_scale)
    if not normalize:
        inv = torch.ones_like(inv)
    if ids is None:
        ids = torch.arange(n, device=image.device)
    rows = slice(row_start, row_start + n_local)
    outs = []
    for d, (q, k, inv_q, inv_k) in enumerate(((image, text, inv[0], inv[1]),
                                             (text, image, inv[1], inv[0]))):
        lse_d, pos_sum, cnt_d, row_sum, neg_d = _torch_rows_fwd(
            q[rows], k, inv_q[rows], inv_k, ids[rows], ids, logit_scale,
            None if uniforms is None else uniforms[d], mode)
        # -Σ_j target_ij log softmax(s)_ij with the smoothed multi-positive target.
        outs.append((lse_d - keep * pos_sum / cnt_d - smooth * row_sum, lse_d, cnt_d, neg_d))
    row_loss, lse, pos_cnt, neg = (torch.stack(t) for t in zip(*outs))
    # ½ (mean over image rows + mean over text rows)
    return row_loss.sum() * (0.5 / n_local), neg, lse, pos_cnt, inv


@autocast_free
def _backward_impl(grad_loss, image, text, logit_scale, ids, inv, lse, pos_cnt, row_start,
                   label_smoothing, backend, normalize=True):
    """Gradients of the loss w.r.t. the gathered image and text features and logit_scale."""
    n, dim = image.shape
    n_local = lse.shape[1]
    acc = _acc_dtype(image.dtype)
    keep, smooth = 1.0 - label_smoothing, label_smoothing / n
    if backend == "triton":
        d_image, d_text, d_scale = _triton_bwd(
            grad_loss.to(acc).reshape(()), image.contiguous(), text.contiguous(), inv, ids,
            logit_scale, lse, pos_cnt, row_start, keep, smooth, normalize)
        return d_image, d_text, d_scale.to(logit_scale.dtype)
    if ids is None:
        ids = torch.arange(n, device=image.device)
    # Every row loss enters with weight 1/2 · 1/n_local (two directions, mean over local rows).
    weight = (grad_loss.to(acc) * (0.5 / n_local)).reshape(())
    rows = slice(row_start, row_start + n_local)
    dq = torch.empty(2, n_local, dim, dtype=acc, device=image.device)
    dk = torch.empty(2, n, dim, dtype=acc, device=image.device)
    d_scale = torch.zeros((), dtype=acc, device=image.device)
    s = logit_scale.to(acc)
    for d, (q, k, inv_q, inv_k) in enumerate(((image, text, inv[0], inv[1]),
                                             (text, image, inv[1], inv[0]))):
        g, cos = _torch_grad_logits(q[rows], k, inv_q[rows], inv_k, ids[rows], ids, logit_scale,
                                    weight, lse[d], pos_cnt[d], keep, smooth)
        dq[d] = s * (g @ (k.to(acc) * inv_k[:, None]))
        dk[d] = s * (g.t() @ (q[rows].to(acc) * inv_q[rows, None]))
        d_scale = d_scale + (g * cos).sum()
    d_image, d_text = _combine_distributed(image, text, inv, dq, dk, row_start, normalize)
    return d_image, d_text, d_scale.to(logit_scale.dtype)


@torch.library.custom_op("unigen::contrastive_loss_fwd", mutates_args=())
def _contrastive_fwd_op(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    ids: Optional[torch.Tensor],
    seeds: Optional[torch.Tensor],
    uniforms: Optional[torch.Tensor],
    row_start: int,
    n_local: int,
    label_smoothing: float,
    mode: int,
    backend: str,
    normalize: bool,
    validate: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_forward_impl`` as one opaque node for torch.compile."""
    return _forward_impl(image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                         label_smoothing, mode, backend, normalize, validate)


@_contrastive_fwd_op.register_fake
def _(image, text, logit_scale, ids, seeds, uniforms, row_start, n_local, label_smoothing, mode,
      backend, normalize, validate):
    acc = _acc_dtype(image.dtype)
    return (image.new_empty((), dtype=acc), image.new_empty((2, n_local), dtype=torch.int64),
            image.new_empty((2, n_local), dtype=acc), image.new_empty((2, n_local), dtype=acc),
            image.new_empty((2, image.shape[0]), dtype=acc))


@torch.library.custom_op("unigen::contrastive_loss_bwd", mutates_args=())
def _contrastive_bwd_op(
    grad_loss: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    ids: Optional[torch.Tensor],
    inv: torch.Tensor,
    lse: torch.Tensor,
    pos_cnt: torch.Tensor,
    row_start: int,
    label_smoothing: float,
    backend: str,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_backward_impl`` as one opaque node for torch.compile."""
    return _backward_impl(grad_loss, image, text, logit_scale, ids, inv, lse, pos_cnt, row_start,
                          label_smoothing, backend, normalize)


@_contrastive_bwd_op.register_fake
def _(grad_loss, image, text, logit_scale, ids, inv, lse, pos_cnt, row_start, label_smoothing,
      backend, normalize):
    return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, ids, _, _, row_start, _, label_smoothing, _, backend, normalize, _ = inputs
    _, _, lse, pos_cnt, inv = output
    ctx.save_for_backward(image, text, logit_scale, ids, inv, lse, pos_cnt)
    ctx.row_start, ctx.label_smoothing, ctx.backend = row_start, label_smoothing, backend
    ctx.normalize = normalize


def _backward(ctx, grad_loss, *unused_grads):
    d_image, d_text, d_scale = _contrastive_bwd_op(
        grad_loss, *ctx.saved_tensors, ctx.row_start, ctx.label_smoothing, ctx.backend, ctx.normalize)
    return d_image, d_text, d_scale, None, None, None, None, None, None, None, None, None, None


_contrastive_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _ContrastiveLossFunction(torch.autograd.Function):
    """The same forward and backward for eager mode, without the custom-op dispatcher.

    At training batch sizes (B = 4096, D = 256) the kernels take tens of microseconds on a GPU,
    so a step costs what the host spends launching them; the custom-op path adds ~40 µs of
    dispatch per forward + backward (measured on CPU). ``contrastive_loss`` takes the custom
    op while torch.compile traces and this Function otherwise; both run ``_forward_impl`` and
    ``_backward_impl``."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                label_smoothing, mode, backend, normalize, validate):
        inputs = (image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                  label_smoothing, mode, backend, normalize, validate)
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for those four outputs
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_grads):
        d_image, d_text, d_scale = _backward_impl(
            grad_loss, *ctx.saved_tensors, ctx.row_start, ctx.label_smoothing, ctx.backend, ctx.normalize)
        return d_image, d_text, d_scale, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional and module
# ----------------------------------------------------------------------------------------------


def _resolve_group(process_group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError(f"{_OP}: process_group given but torch.distributed is not initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _check_rank_sizes(rank_sizes, n_local, group):
    """``rank_sizes`` as a list of ints, validated against what this rank knows without
    communicating: one entry per rank of the group (or one, without a group), non-negative ints,
    this rank's entry equal to its number of pairs. Every rank must pass the same list (another
    rank's entry cannot be checked without the very host sync it saves)."""
    import torch.distributed as dist

    if isinstance(rank_sizes, (str, bytes)) or not hasattr(rank_sizes, "__len__"):
        raise TypeError(f"{_OP}: rank_sizes must be a sequence of ints (pairs per rank), got "
                        f"{type(rank_sizes).__name__}")
    sizes = list(rank_sizes)
    world, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    if len(sizes) != world:
        raise ValueError(f"{_OP}: rank_sizes must have one entry per rank ({world}), got {len(sizes)}")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in sizes):
        raise ValueError(f"{_OP}: rank_sizes must hold non-negative ints, got {sizes}")
    if sizes[rank] != n_local:
        raise ValueError(f"{_OP}: rank_sizes[{rank}] = {sizes[rank]} but this rank holds {n_local} "
                         f"pairs (image_feats.shape[0])")
    return sizes


def _gather(image_feats, text_feats, ids, group, sizes=None):
    """All-gather features with gradient (the backward reduce-scatters every rank's gradient back
    to the owner, as open_clip's ``gather_with_grad``) and ids without. Ranks may hold different
    numbers of pairs (a mixed-task batch carries a varying number, possibly 0): the rows are
    padded to the largest, gathered, and the padding dropped (slices and one concatenation,
    sizes known on the host). ``sizes`` (the caller's ``rank_sizes``) makes that a step without
    a host sync; without it the sizes are gathered first — one small host-device sync.
    Without ``ids`` the gathered batch keeps pair i's positive at column i (ranks in order,
    padding dropped), so no ids are made or gathered. Functional collectives keep the gathers
    traceable by torch.compile."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    # Newer torch names the gather-along-dim-0 collectives *_single (the *_tensor names warn as
    # deprecated); older releases (e.g. torch 2.11) only have *_tensor.
    gather_grad = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    rank = dist.get_rank(group)
    device = image_feats.device
    n_local = image_feats.shape[0]
    if sizes is None:
        sizes = funcol.wait_tensor(gather(torch.tensor([n_local], device=device), 0, group)).tolist()
    n_max = max(sizes)
    pad = n_max - n_local
    image_all = funcol.wait_tensor(gather_grad(F.pad(image_feats, (0, 0, 0, pad)).contiguous(), 0, group))
    text_all = funcol.wait_tensor(gather_grad(F.pad(text_feats, (0, 0, 0, pad)).contiguous(), 0, group))
    gathered = [image_all, text_all]
    if ids is not None:
        gathered.append(funcol.wait_tensor(gather(F.pad(ids, (0, pad)).contiguous(), 0, group)))
    if min(sizes) != n_max:
        gathered = [torch.cat([x[r * n_max:r * n_max + k] for r, k in enumerate(sizes)])
                    for x in gathered]
    ids_all = gathered[2] if ids is not None else None
    return gathered[0], gathered[1], ids_all, sum(sizes[:rank])


def contrastive_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    logit_scale,
    *,
    ids: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    negatives: Optional[str] = "sample",
    generator: Optional[torch.Generator] = None,
    process_group=None,
    backend: str = "auto",
    normalize: bool = True,
    rank_sizes: Optional[Sequence[int]] = None,
    validate: Optional[bool] = None,
) -> ContrastiveLossOutput:
    """Symmetric InfoNCE on ``logit_scale · cos(image_feats, text_feats)`` with hard-negative mining.

    Args:
        image_feats, text_feats: ``[B, D]`` float features of the B local pairs (same dtype).
        logit_scale: the multiplier (``exp`` of the log-temperature), a 0-d / 1-element tensor (it
            receives a gradient) or a Python number; must be positive and finite.
        ids: optional ``[B]`` int32/int64 pair ids; pairs sharing an id are all positives of each
            other (multi-positive targets, never mined). Default: pair i is the only positive of i.
        label_smoothing: ε in [0, 1): target = (1-ε)·uniform(positives) + ε·uniform(batch).
        negatives: ``"sample"`` (∝ softmax of the similarity over the non-positives), ``"hardest"``
            (argmax) or None (no mining).
        generator: a ``torch.Generator`` on the features' device for reproducible sampling.
        process_group: all-gather over this group (default: the default group when
            ``torch.distributed`` is initialised with more than one rank).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (``"cpp"`` raises: no C++ op).
        normalize: True (default): similarity = cosine. False: raw dot products
            ``logit_scale · image_feats @ text_featsᵀ`` for features the caller has normalised
            itself (open_clip's convention), with the exact gradient of that formula (no
            projection through a normalisation).
        rank_sizes: optional, under a process group: the number of pairs every rank holds this
            step (``rank_sizes[r]`` for rank r of the group, the same list on every rank; this
            rank's entry must equal ``image_feats.shape[0]``). Given, the gather needs no host
            sync (the sizes are not gathered, and padding is dropped with host-known slices);
            omitted, the sizes are gathered first, which reads them on the host once a step
            (a device sync on GPUs). The result is the same either way.
        validate: check that the features are finite (and their norms representable) and a
            tensor ``logit_scale`` positive and finite. The op's first pass computes the flags
            anyway (its finish kernel reduces them), so the check costs no reduction: ``None``
            (default) checks on CPU, where a host read is free, raising ValueError naming the
            argument; ``True`` on CUDA adds one device-side assertion (no host sync); ``False``
            skips it: non-finite features then give a non-finite loss, and the mined indices stay
            in [-1, N). See docs/architecture.md, "Non-finite inputs".

    Returns:
        ``ContrastiveLossOutput(loss, neg_text_for_image, neg_image_for_text)``; the negatives are
        int64 indices into the gathered batch (``[B]`` local rows), -1 where a row has no
        non-positive candidate.

    Autocast: under ``torch.autocast`` the features are cast to the autocast dtype (as the
    similarity matmul would be); the math stays fp32 and the loss is fp32.
    """
    if isinstance(image_feats, torch.Tensor):
        image_feats, text_feats = cast_inputs(autocast_dtype(image_feats.device), image_feats, text_feats)
    check_tensor(image_feats, "image_feats", op=_OP, ndim=2, dtypes=FLOAT_DTYPES)
    device = image_feats.device
    check_tensor(text_feats, "text_feats", op=_OP, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if text_feats.dtype != image_feats.dtype:
        raise TypeError(f"{_OP}: image_feats and text_feats must have the same dtype, got "
                        f"{image_feats.dtype} and {text_feats.dtype}")
    if image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(f"{_OP}: image_feats and text_feats must have the same batch size, got "
                         f"{image_feats.shape[0]} and {text_feats.shape[0]}")
    if image_feats.shape[1] != text_feats.shape[1]:
        raise ValueError(f"{_OP}: image_feats and text_feats must have the same feature dim, got "
                         f"{image_feats.shape[1]} and {text_feats.shape[1]}")
    n_local, dim = image_feats.shape
    group = _resolve_group(process_group)
    # Under data parallelism a rank may hold no pair this step; it still joins the gathers.
    if (n_local == 0 and group is None) or dim == 0:
        raise ValueError(f"{_OP}: image_feats is empty (shape {tuple(image_feats.shape)})")
    if negatives not in _NEGATIVE_MODES:
        raise ValueError(f"{_OP}: negatives must be 'sample', 'hardest' or None, got {negatives!r}")
    mode = _NEGATIVE_MODES[negatives]
    if not isinstance(normalize, bool):
        raise TypeError(f"{_OP}: normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if ids is not None:
        check_tensor(ids, "ids", op=_OP, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if ids.shape[0] != n_local:
            raise ValueError(f"{_OP}: ids must have one entry per pair ({n_local}), got {ids.shape[0]}")
        ids = ids.to(torch.int64).contiguous()
    if isinstance(logit_scale, torch.Tensor):
        check_tensor(logit_scale, "logit_scale", op=_OP, dtypes=FLOAT_DTYPES, device=device)
        if logit_scale.numel() != 1:
            raise ValueError(f"{_OP}: logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        logit_scale = logit_scale.reshape(())
    elif isinstance(logit_scale, (int, float)):
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"{_OP}: logit_scale must be positive and finite, got {logit_scale}")
        logit_scale = torch.tensor(float(logit_scale), dtype=_acc_dtype(image_feats.dtype), device=device)
    else:
        raise TypeError(f"{_OP}: logit_scale must be a tensor or a number, got {type(logit_scale).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{_OP}: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"{_OP}: generator is on {generator.device} but the features are on {device}")

    # Non-finite features and a non-positive logit_scale are caught by the op's first pass over
    # the features (it computes their norms) when validate resolves to True: a ValueError on
    # CPU, a device-side assertion on CUDA, where raising would need a host sync
    # (_check_prep_flags).
    resolve_validate(validate, device, op=_OP)  # a bad value raises before any work

    be = resolve_backend(backend, device, op=_OP, has_cpp=False)

    sizes = None if rank_sizes is None else _check_rank_sizes(rank_sizes, n_local, group)
    if group is not None:
        image_all, text_all, ids_all, row_start = _gather(image_feats, text_feats, ids, group, sizes)
    else:
        image_all, text_all, ids_all, row_start = image_feats, text_feats, ids, 0
    n = image_all.shape[0]
    if n < 2 and group is None:
        raise ValueError(f"{_OP}: needs at least 2 image-text pairs in the batch, got {n}")
    if n_local == 0 or n < 2:
        # No local rows, or a gathered batch of one pair (no negative exists): a zero loss that
        # still reaches the gathered features, so this rank takes part in the backward's
        # reduce-scatter like the others; no negative can be mined (-1).
        loss = (image_all.sum() + text_all.sum()) * 0.0 * logit_scale
        none = torch.full((n_local,), -1, dtype=torch.int64, device=device)
        return ContrastiveLossOutput(loss, *((None, None) if mode == 0 else (none, none.clone())))
    return _contrastive_on_gathered(image_all, text_all, logit_scale, ids_all, row_start, n_local,
                                    float(label_smoothing), mode, generator, be, backend, normalize,
                                    validate)


def _contrastive_on_gathered(image_all, text_all, logit_scale, ids_all, row_start, n_local,
                             label_smoothing, mode, generator, be, backend, normalize, validate=None):
    """The op on an already gathered batch: the loss of rows ``row_start:row_start + n_local``
    (both directions) against all N columns, with the exact gradient w.r.t. ``image_all`` and
    ``text_all``. ``contrastive_loss`` gathers first; ``ClipLoss`` gathers the way open_clip does."""
    n, dim = image_all.shape
    device = image_all.device
    # The kernels keep a feature row on chip (D ≤ 1024) and index with int32 (2·N·D < 2^31).
    if be == "triton" and (dim > _TRITON_MAX_DIM or 2 * n * dim >= 2**31):
        if backend == "triton":
            raise ValueError(f"{_OP}: backend='triton' supports feature dim ≤ {_TRITON_MAX_DIM} and "
                             f"2·batch·dim < 2^31, got batch {n}, dim {dim}")
        be = "torch"

    seeds = uniforms = None
    if mode == 1:
        if be == "triton":
            # One int64 Philox seed, drawn on device from the generator (no host sync,
            # reproducible with an explicit generator); the kernels' counters name the row, the
            # column tile or split, the stage and the direction of every draw.
            seeds = torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
        else:
            # one uniform in (0, 1) per row and direction: torch.rand's fp32 draws are multiples
            # of 2^-24 in [0, 1), shifted by half a step
            uniforms = torch.rand(2, n_local, generator=generator, device=device) + 2.0**-25

    # torch.compile traces the custom op; eager mode skips its dispatcher (host time is what a
    # step at training batch sizes costs: see _ContrastiveLossFunction).
    op = _contrastive_fwd_op if torch.compiler.is_compiling() else _ContrastiveLossFunction.apply
    check = resolve_validate(validate, device, op=_OP)
    loss, neg, _, _, _ = op(image_all, text_all, logit_scale, ids_all, seeds, uniforms, row_start,
                            n_local, label_smoothing, mode, be, normalize, check)
    if mode == 0:
        return ContrastiveLossOutput(loss, None, None)
    return ContrastiveLossOutput(loss, neg[0], neg[1])


class ContrastiveLoss(torch.nn.Module):
    """Symmetric InfoNCE with a learnable temperature and hard-negative mining.

    Owns ``log_logit_scale`` (log of the multiplier, i.e. -log τ), initialised to log(1/0.07) and
    clamped to at most log(100) in the forward, as CLIP does.
    """

    def __init__(self, *, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 learnable_temperature: bool = True, label_smoothing: float = 0.0,
                 negatives: Optional[str] = "sample", process_group=None, backend: str = "auto",
                 validate: Optional[bool] = None):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"ContrastiveLoss: init_temperature must be positive, got {init_temperature}")
        if not max_logit_scale > 0:
            raise ValueError(f"ContrastiveLoss: max_logit_scale must be positive, got {max_logit_scale}")
        value = torch.tensor(math.log(1.0 / init_temperature))
        if learnable_temperature:
            self.log_logit_scale = torch.nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.label_smoothing = label_smoothing
        self.negatives = negatives
        self.process_group = process_group
        self.backend = backend
        self.validate = validate

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def forward(self, image_feats, text_feats, *, ids=None, generator=None,
                rank_sizes=None) -> ContrastiveLossOutput:
        return contrastive_loss(
            image_feats, text_feats, self.logit_scale, ids=ids, label_smoothing=self.label_smoothing,
            negatives=self.negatives, generator=generator, process_group=self.process_group,
            backend=self.backend, rank_sizes=rank_sizes, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, negatives={self.negatives!r}, "
                f"max_logit_scale={math.exp(self.max_log_logit_scale):g}, backend={self.backend!r}")
