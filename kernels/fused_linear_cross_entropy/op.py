"""Registration of the fused cross-entropy.

- the ``torch.library`` custom ops ``unigen::flce_forward``, ``unigen::flce_backward`` and
  ``unigen::flce_forward_reduced`` (one opaque node each for torch.compile, with fake kernels
  and autograd attached), which dispatch to the reference, the CPU row-block path or the Triton
  launchers;
- the fake kernels and autograd of the C++ ops ``torch.ops.unigen.fused_linear_cross_entropy*``
  (when ``unigen._C`` is built);
- the functional form :func:`fused_linear_cross_entropy` and the module
  :class:`FusedLinearCrossEntropyLoss`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from unigen._extension import cpp_ops_available

from ..common.autocast import autocast_disabled, autocast_dtype, cast_inputs
from ..common.backend import resolve_backend
from ..common.checks import (
    FLOAT_DTYPES,
    check_finite_result,
    check_saved_storage,
    check_tensor,
    name_non_finite,
    resolve_validate,
)
from .checks import OP, _check_inputs
from .cpu import reference_forward_reduced
from .launch import triton_backward, triton_forward, triton_forward_reduced
from .reference import _math_dtype, reference_backward, reference_forward
from .vocab_parallel import (
    VocabShard,
    has_dtensor,
    resolve_sharding,
    vocab_parallel_backward,
    vocab_parallel_forward,
)


class CrossEntropyStats(NamedTuple):
    """Per-row statistics for logging (detached, fp32/bool, 0/False on ignored rows)."""

    lse: torch.Tensor  # log-sum-exp of the logits
    correct: torch.Tensor  # argmax(logits) == target


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: one opaque node for torch.compile, autograd attached
# ---------------------------------------------------------------------------------------------

_PY_IMPLS = ("torch", "triton")


def _pick(impl, triton_fn, torch_fn):
    """The custom ops' body for ``impl`` (a string argument, so the ops stay traceable)."""
    if impl not in _PY_IMPLS:
        raise ValueError(f"{OP}: unknown implementation {impl!r}")
    return triton_fn if impl == "triton" else torch_fn


# Every op body runs with autocast disabled: its matmuls must stay in the dtypes it chose (the
# autocast rule is applied once, at the entry of fused_linear_cross_entropy).
@torch.library.custom_op("unigen::flce_forward", mutates_args=())
def _flce_forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                     softcap: float, impl: str, stats: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        forward = _pick(impl, triton_forward, reference_forward)
        return forward(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss,
                       softcap, stats=stats)


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
        backward = _pick(impl, triton_backward, reference_backward)
        grads = backward(grad_rows, hidden, weight, bias, target, lse, ignore_index,
                         label_smoothing, z_loss, need_hidden, need_weight, need_bias, softcap)
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


@torch.library.custom_op("unigen::flce_forward_reduced", mutates_args=())
def _flce_forward_reduced_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             target: torch.Tensor, row_scale: torch.Tensor, ignore_index: int,
                             label_smoothing: float, z_loss: float, softcap: float, impl: str,
                             need_hidden: bool, need_weight: bool, need_bias: bool,
                             stats: bool = True, fp32_logits: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        forward = _pick(impl, triton_forward_reduced, reference_forward_reduced)
        out = forward(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing,
                      z_loss, need_hidden, need_weight, need_bias, softcap, stats=stats,
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


# ---------------------------------------------------------------------------------------------
# the vocabulary-parallel ops (vocab_parallel.py): the group travels as its name
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("unigen::flce_vocab_parallel_forward", mutates_args=())
def _vp_forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   target: torch.Tensor, ignore_index: int, label_smoothing: float, z_loss: float,
                   softcap: float, group_name: str, vocab_start: int, vocab_total: int, world: int,
                   stats: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        rows, lse, correct, *_ = vocab_parallel_forward(
            hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap,
            VocabShard(group_name, vocab_start, vocab_total, world), stats=stats)
    return rows, lse, correct


@_vp_forward_op.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap, group_name,
      vocab_start, vocab_total, world, stats=True):
    n, acc = hidden.shape[0], _math_dtype(hidden.dtype)
    return (hidden.new_empty(n, dtype=acc), hidden.new_empty(n, dtype=acc),
            hidden.new_empty(n if stats else 0, dtype=torch.bool))


@torch.library.custom_op("unigen::flce_vocab_parallel_backward", mutates_args=())
def _vp_backward_op(grad_rows: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, target: torch.Tensor, lse: torch.Tensor,
                    ignore_index: int, label_smoothing: float, z_loss: float, softcap: float,
                    group_name: str, vocab_start: int, vocab_total: int, world: int,
                    need_hidden: bool, need_weight: bool, need_bias: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        grads = vocab_parallel_backward(grad_rows, hidden, weight, bias, target, lse, ignore_index,
                                        label_smoothing, z_loss, softcap,
                                        VocabShard(group_name, vocab_start, vocab_total, world),
                                        need_hidden, need_weight, need_bias)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_vp_backward_op.register_fake
def _(grad_rows, hidden, weight, bias, target, lse, ignore_index, label_smoothing, z_loss, softcap,
      group_name, vocab_start, vocab_total, world, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _vp_setup_context(ctx, inputs, output):
    hidden, weight, bias, target = inputs[:4]
    ctx.options = inputs[4:12]  # ignore_index, label_smoothing, z_loss, softcap, group, start, total, world
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, target, output[1])


def _vp_backward(ctx, grad_rows, _grad_lse, _grad_correct):
    hidden, weight, bias, target, lse = ctx.saved_tensors
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
    n_inputs = len(ctx.needs_input_grad)
    if not any(need):
        return (None,) * n_inputs
    check_saved_storage(weight, "weight", op=OP)
    gh, gw, gb = _vp_backward_op(grad_rows, hidden, weight, bias, target, lse, *ctx.options, *need)
    return tuple(g if n else None for g, n in zip((gh, gw, gb), need)) + (None,) * (n_inputs - 3)


torch.library.register_autograd("unigen::flce_vocab_parallel_forward", _vp_backward,
                                setup_context=_vp_setup_context)


@torch.library.custom_op("unigen::flce_vocab_parallel_forward_reduced", mutates_args=())
def _vp_forward_reduced_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           target: torch.Tensor, row_scale: torch.Tensor, ignore_index: int,
                           label_smoothing: float, z_loss: float, softcap: float, group_name: str,
                           vocab_start: int, vocab_total: int, world: int, need_hidden: bool,
                           need_weight: bool, need_bias: bool, stats: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                      torch.Tensor, torch.Tensor]:
    with autocast_disabled(hidden.device):
        _, lse, correct, total, gh, gw, gb = vocab_parallel_forward(
            hidden, weight, bias, target, ignore_index, label_smoothing, z_loss, softcap,
            VocabShard(group_name, vocab_start, vocab_total, world), stats=stats, row_scale=row_scale,
            need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
    return (total, lse, correct) + tuple(g if g is not None else hidden.new_empty(0) for g in (gh, gw, gb))


@_vp_forward_reduced_op.register_fake
def _(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing, z_loss, softcap,
      group_name, vocab_start, vocab_total, world, need_hidden, need_weight, need_bias, stats=True):
    return _fake_reduced(hidden, weight, bias, target, row_scale, ignore_index, label_smoothing,
                         z_loss, need_hidden, need_weight, need_bias, stats)


torch.library.register_autograd("unigen::flce_vocab_parallel_forward_reduced", _backward_reduced,
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
# functional form and module
# ---------------------------------------------------------------------------------------------


def fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100,
                               label_smoothing=0.0, z_loss=0.0, token_weights=None,
                               reduction="mean", backend="auto", return_stats=False, softcap=None,
                               process_group=None, class_weights=None, validate=None):
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
            weighted-mean convention) for any non-zero ``Σ w``, negative included (advantages);
            ``Σ w = 0`` gives nan with zero gradients, as when every row is ignored.
        class_weights: optional ``[V]`` per-class weights with ``F.cross_entropy(weight=...)``'s
            exact semantics, label smoothing included (each class's smoothing term weighted, the
            mean divided by ``Σ_n w[target_n]``); multiplied with ``token_weights`` where both
            are given. Not with ``z_loss``, with a soft-cap and label smoothing together, or over
            a vocabulary split.
        reduction: ``"mean"`` (0/0 = nan when every row is ignored, as PyTorch), ``"sum"``
            (0 when every row is ignored) or ``"none"`` (``[...]``, 0 on ignored rows).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"cpp"`` (see :mod:`unigen.kernels`).
        return_stats: also return :class:`CrossEntropyStats` (per-row lse and argmax-correctness,
            detached) for logging.
        process_group: vocabulary parallelism with plain tensors (Megatron style): ``weight`` and
            ``bias`` are this rank's contiguous slice of the vocabulary (in rank order, sizes may
            differ), ``hidden``/``target``/``token_weights`` the same on every rank of the group.
            Loss, statistics and every gradient equal the unsharded op's; ``hidden``'s gradient
            is whole on every rank (summed over the slices). A DTensor ``weight`` sharded along
            the vocabulary (``Shard(0)``, ColwiseParallel's layout) does the same over its mesh,
            with ``hidden`` a DTensor replicated there; other DTensors are used locally
            (see :mod:`unigen.kernels.fused_linear_cross_entropy.vocab_parallel`, which also
            lists the communication per call).
        validate: check that no non-finite value (nan, inf) in ``hidden``, ``weight``, ``bias`` or
            ``token_weights`` reaches the loss: the log-sum-exp of every kept row (computed anyway)
            and their token weights are tested, one reduction over N values. ``None`` (default):
            on CPU only, where it costs nothing; ``True`` on CUDA adds that reduction and a
            device-side assertion (no host sync); ``False``: non-finite inputs give a non-finite
            loss. A failed check on CPU raises ValueError naming the argument (see
            docs/architecture.md, "Non-finite inputs").

    Autocast: under ``torch.autocast`` hidden, weight and bias are cast to the autocast dtype (as
    the ``F.linear`` this op fuses would be), the math stays fp32 and the loss is fp32 (as
    autocast's ``F.cross_entropy``), on every backend and for every reduction.

    Returns:
        the loss in fp32 (fp64 for fp64 inputs) — the one rule of every op's loss, with or
        without autocast (as transformers' loss and Cut Cross-Entropy) — and the stats when
        ``return_stats``.
    """
    if class_weights is not None:
        return _class_weighted(hidden, weight, target, bias, class_weights, ignore_index=ignore_index,
                               label_smoothing=label_smoothing, z_loss=z_loss, token_weights=token_weights,
                               reduction=reduction, backend=backend, return_stats=return_stats,
                               softcap=softcap, process_group=process_group, validate=validate)
    shard = None
    if process_group is not None or has_dtensor(hidden, weight, bias, target, token_weights):
        hidden, weight, bias, target, token_weights, shard = resolve_sharding(
            hidden, weight, bias, target, token_weights, process_group)
    cast_to = autocast_dtype(hidden.device) if isinstance(hidden, torch.Tensor) else None
    hidden, weight, bias = cast_inputs(cast_to, hidden, weight, bias)
    _check_inputs(hidden, weight, target, bias, token_weights, ignore_index, label_smoothing,
                  z_loss, reduction, softcap, vocab=shard.total if shard is not None else None)
    cap = float(softcap or 0.0)
    if shard is not None:
        if backend not in ("auto", "torch"):
            raise ValueError(f"{OP}: backend={backend!r} has no vocabulary-parallel path (the sharded op "
                             f"runs PyTorch GEMMs on any device); use backend='auto' or 'torch'")
        return _vocab_parallel_loss(hidden, weight, target, bias, shard, ignore_index,
                                    float(label_smoothing), float(z_loss), cap, token_weights,
                                    reduction, return_stats, validate)
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
        loss = _reduce_rows(rows, w, valid, reduction, lead_shape)
    if resolve_validate(validate, hidden.device, op=OP):
        _check_finite_rows(lse, valid, w, h2, weight, bias)
    # the loss stays in the math dtype (fp32; fp64 for fp64 inputs): the ops' one output rule
    if return_stats:
        return loss, CrossEntropyStats(lse.detach().reshape(lead_shape), correct.reshape(lead_shape))
    return loss


def _check_finite_rows(lse, valid, token_weights, hidden, weight, bias, *, sharded=False):
    """The loss is finite where the kept rows' log-sum-exp and token weights are: a non-finite
    input reaches them (a nan or inf in a kept hidden row, anywhere in ``weight`` or ``bias``);
    ignored rows never reach the loss and are not checked."""
    finite = torch.isfinite(torch.where(valid, lse.detach(), 0.0)).all()
    if token_weights is not None:
        finite = finite & torch.isfinite(torch.where(valid, token_weights.detach(), 0.0)).all()
    check_finite_result(finite, op=OP, diagnose=lambda: name_non_finite(
        OP, [("hidden", hidden.detach()[valid]), ("weight", weight.detach()),
             ("bias", None if bias is None else bias.detach()),
             ("token_weights", None if token_weights is None else token_weights.detach()[valid])],
        "the logits' log-sum-exp is not finite although this rank's inputs are: "
        + ("another rank's slice of weight or bias holds a nan or inf, or " if sharded else "")
        + "the logits' magnitude overflows"))


def _vocab_parallel_loss(hidden, weight, target, bias, shard, ignore_index, ls, zl, cap,
                         token_weights, reduction, return_stats, validate):
    """:func:`fused_linear_cross_entropy` over a vocabulary split (the two paths, as above)."""
    lead_shape = target.shape
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    valid = t1 != ignore_index
    w = token_weights.reshape(-1) if token_weights is not None else None
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    group = (shard.group_name, shard.start, shard.total, shard.world)
    if reduction != "none" and (w is None or not w.requires_grad):
        grad_on = torch.is_grad_enabled()
        need = [grad_on and x is not None and x.requires_grad for x in (h2, weight, bias)]
        scale = w.to(acc) if w is not None else torch.ones(t1.shape[0], dtype=acc, device=h2.device)
        total, lse, correct, *_ = _vp_forward_reduced_op(h2, weight, bias, t1, scale, ignore_index, ls, zl,
                                                         cap, *group, *need, stats=bool(return_stats))
        loss = total if reduction == "sum" else _safe_mean(total, torch.where(valid, scale, 0.0).sum())
    else:
        rows, lse, correct = _vp_forward_op(h2, weight, bias, t1, ignore_index, ls, zl, cap, *group,
                                            stats=bool(return_stats))
        loss = _reduce_rows(rows, w, valid, reduction, lead_shape)
    if resolve_validate(validate, hidden.device, op=OP):  # lse is the global one on every rank
        _check_finite_rows(lse, valid, w, h2, weight, bias, sharded=True)
    if return_stats:
        return loss, CrossEntropyStats(lse.detach().reshape(lead_shape), correct.reshape(lead_shape))
    return loss


def _reduce_rows(rows, w, valid, reduction, lead_shape):
    """The reduction of per-row losses (the ``"none"`` path and weights with a gradient)."""
    if w is not None:
        rows = rows * w.to(rows.dtype)
    if reduction == "none":
        return rows.reshape(lead_shape)
    if reduction == "sum":
        return rows.sum()
    denom = torch.where(valid, w.to(rows.dtype), 0.0).sum() if w is not None else valid.sum(dtype=rows.dtype)
    return _safe_mean(rows.sum(), denom)


def _safe_mean(total, denom):
    """total / denom for any non-zero denom (a weighted mean's weights may be negative, as
    PyTorch's); nan with zero gradients when it is 0 (every row ignored, or weights summing to
    0), without a host sync."""
    nonzero = denom != 0
    inv = torch.where(nonzero, 1.0 / torch.where(nonzero, denom, 1.0), 0.0)
    return torch.where(nonzero, total * inv, torch.full_like(total, float("nan")))


def _class_weighted(hidden, weight, target, bias, class_weights, *, ignore_index, label_smoothing,
                    z_loss, token_weights, reduction, backend, return_stats, softcap, process_group,
                    validate):
    """``F.cross_entropy(F.linear(...), target, weight=class_weights, label_smoothing=ε)``, fused.

    PyTorch's row loss is ``(1-ε)·w_t·(lse - z_t) + (ε/V)·Σ_j w_j·(lse - z_j)`` and its mean
    divides by ``Σ_n w_{t_n}``. With ``W = Σ_j w_j`` that is

        [(1-ε)·w_t + (ε/V)·W]·(lse - z_t)  +  (ε/V)·(W·z_t - Σ_j w_j·z_j)

    — the op's unsmoothed loss with that row weight, plus a term linear in the hidden states:
    ``Σ_j w_j·z_j = h·(Wᵀw) + b·w``, ``z_t = h·W_t + b_t`` (one gathered row of W per row; no
    logits). Without smoothing it is the op with row weights ``w_t``.
    """
    check_tensor(class_weights, "class_weights", op=OP, ndim=1, dtypes=FLOAT_DTYPES)
    if isinstance(weight, torch.Tensor) and class_weights.shape[0] != weight.shape[0]:
        raise ValueError(f"{OP}: class_weights has {class_weights.shape[0]} entries, weight has "
                         f"V={weight.shape[0]} rows")
    if z_loss:
        raise ValueError(f"{OP}: class_weights with z_loss is not defined (PyTorch has no weighted z-loss); "
                         f"pass one of them")
    if process_group is not None or has_dtensor(hidden, weight, bias, target, token_weights, class_weights):
        raise ValueError(f"{OP}: class_weights is not supported with a vocabulary split (process_group or "
                         f"DTensor weights)")
    eps = float(label_smoothing)
    if eps > 0.0 and softcap:
        raise ValueError(f"{OP}: class_weights with label_smoothing and softcap together is not supported "
                         f"(the capped logits' weighted sum is not linear in hidden)")
    if not isinstance(target, torch.Tensor) or class_weights.device != target.device:
        raise ValueError(f"{OP}: class_weights is on {class_weights.device} but target is on "
                         f"{getattr(target, 'device', None)}")
    valid = target != ignore_index
    w_t = torch.where(valid, class_weights[torch.where(valid, target, 0).long()], 0.0)
    if token_weights is not None:
        w_t = w_t * token_weights.to(w_t.dtype)
    common = dict(ignore_index=ignore_index, backend=backend, return_stats=return_stats, softcap=softcap,
                  validate=validate)
    if eps == 0.0:
        return fused_linear_cross_entropy(hidden, weight, target, bias, token_weights=w_t.to(hidden.dtype),
                                          reduction=reduction, **common)
    vocab, total_w = weight.shape[0], class_weights.sum()
    cw = class_weights[torch.where(valid, target, 0).long()]
    row_weight = (1.0 - eps) * cw + (eps / vocab) * total_w
    if token_weights is not None:
        row_weight = row_weight * token_weights.to(row_weight.dtype)
    out = fused_linear_cross_entropy(hidden, weight, target, bias, token_weights=row_weight.to(hidden.dtype),
                                     reduction="none", **common)
    rows, stats = out if return_stats else (out, None)
    # the linear term, in the math dtype from the inputs as the op takes them (autocast's cast)
    cast_to = autocast_dtype(hidden.device)
    h, w, b = cast_inputs(cast_to, hidden, weight, bias)
    acc = rows.dtype
    with autocast_disabled(hidden.device):
        h, w = h.to(acc), w.to(acc)
        cwa = class_weights.to(acc)
        u = cwa @ w  # Σ_j w_j·W_j, [D]
        t_safe = torch.where(valid, target, 0).long()
        lin = (h * (total_w.to(acc) * w[t_safe] - u)).sum(-1)
        if b is not None:
            b = b.to(acc)
            lin = lin + total_w.to(acc) * b[t_safe] - (b * cwa).sum()
        lin = torch.where(valid, (eps / vocab) * lin, 0.0)
        if token_weights is not None:
            lin = lin * token_weights.to(acc)
    rows = rows + lin
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = _safe_mean(rows.sum(), w_t.to(acc).sum())
    return (loss, stats) if return_stats else loss


class FusedLinearCrossEntropyLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: a drop-in for
    ``nn.CrossEntropyLoss(weight=class_weights)(F.linear(hidden, weight, bias), target)``
    (``class_weights`` is a buffer, as ``nn.CrossEntropyLoss``'s ``weight``)."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean",
                 backend="auto", softcap=None, class_weights=None, process_group=None, validate=None):
        super().__init__()
        self.validate = validate
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.reduction = reduction
        self.backend = backend
        self.process_group = process_group
        self.register_buffer("class_weights", class_weights)

    def forward(self, hidden, weight, target, bias=None, *, token_weights=None, return_stats=False):
        return fused_linear_cross_entropy(
            hidden, weight, target, bias, ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing, z_loss=self.z_loss, token_weights=token_weights,
            reduction=self.reduction, backend=self.backend, return_stats=return_stats,
            softcap=self.softcap, process_group=self.process_group, class_weights=self.class_weights,
            validate=self.validate)

    def extra_repr(self):
        return (f"ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing}, "
                f"z_loss={self.z_loss}, softcap={self.softcap}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")
