"""Registration of the packed prefix-LM attention.

- ``_forward_impl`` / ``_backward_impl``: the Triton path the op takes (per-sample or tiled,
  decided on the host from ``max_seqlen``);
- the ``torch.library`` custom ops ``unigen::prefix_lm_attention_fwd`` and
  ``unigen::prefix_lm_attention_bwd``: torch.compile sees two opaque ops with fake kernels and an
  autograd formula, so it traces through without graph breaks; ``_PrefixLMAttentionFunction``
  runs the same launchers in eager mode without the dispatcher;
- the backend choice (``_resolve``), the functional form :func:`prefix_lm_attention` (argument
  checks, then dispatch to a backend) and the module :class:`PrefixLMAttention`.
"""

from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

from ..common.autocast import autocast_disabled, autocast_dtype, autocast_free, cast_inputs
from ..common.backend import resolve_backend, triton_available, triton_interpreting
from ..common.checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_finite_result,
    check_tensor,
    name_non_finite,
    resolve_validate,
)
from .checks import OP, _is_compiling, check_cu_seqlens
from .launch import (
    triton_backward,
    triton_forward,
    triton_sample_backward,
    triton_sample_forward,
    triton_sample_ids,
    uses_per_sample_kernels,
)
from .portable_backends import (
    _flash_attn_forward,
    _flex_forward,
    _load_flash_attn_varlen,
    _load_torch_varlen,
    _sdpa_forward,
    flash_attn_available,
)
from .reference import prefix_lm_attention_reference

#: Every value ``backend=`` accepts. ``"torch"`` is the dense-mask reference (O(T^2) memory: tests
#: and small inputs only); ``"sdpa"`` pads the batch and calls PyTorch SDPA with a boolean mask;
#: ``"flex"`` is FlexAttention with a packed prefix-LM block mask; ``"flash_attn"`` the
#: flash-attn varlen kernel (two calls for prefix-LM); ``"torch_varlen"`` the same decomposition
#: over PyTorch's own varlen flash kernel; ``"cpp"`` has no implementation.
ATTENTION_BACKENDS = ("auto", "triton", "torch", "sdpa", "flex", "flash_attn", "torch_varlen", "cpp")

#: Dtypes the Triton kernels take (tl.dot has no float64 path on every GPU we target).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest head_dim the Triton kernels handle (the q tile and the fp32 accumulator live in
#: registers; beyond 256 they spill).
TRITON_MAX_HEAD_DIM = 256

# read once: torch.compile traces _resolve and would warn about the lru_cache of the function
_HAS_TRITON = triton_available()


# ---------------------------------------------------------------------------------------------
# torch.library custom ops: torch.compile sees two opaque ops with fake kernels and an
# autograd formula, so it traces through without graph breaks.
# ---------------------------------------------------------------------------------------------


@autocast_free  # the kernels keep their own dtypes under autocast (its rule is applied at entry)
def _forward_impl(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
    """(out, lse, seq_id). Samples of at most 128 tokens: the per-sample kernel, which needs no
    sample ids (``seq_id`` is empty). Longer: the tiled kernels, whose sample ids are computed
    once here and saved for the backward."""
    if uses_per_sample_kernels(max_seqlen, q.shape[-1], q.dtype):
        out, lse = triton_sample_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale,
                                         max_seqlen)
        return out, lse, q.new_empty((0,), dtype=torch.int32)
    seq_id = triton_sample_ids(cu_seqlens, q.shape[0])
    out, lse = triton_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale, seq_id=seq_id)
    return out, lse, seq_id


@autocast_free
def _backward_impl(do, q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id, max_seqlen,
                   softmax_scale):
    """(dq, dk, dv) on the path the forward took (the same host-side rule)."""
    if uses_per_sample_kernels(max_seqlen, q.shape[-1], q.dtype):
        return triton_sample_backward(do, q, k, v, lse, cu_seqlens, prefix_lens, softmax_scale,
                                      max_seqlen)
    return triton_backward(do, q, k, v, out, lse, cu_seqlens, prefix_lens, softmax_scale,
                           seq_id=seq_id)


@torch.library.custom_op("unigen::prefix_lm_attention_fwd", mutates_args=())
def _prefix_lm_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                                max_seqlen: int, softmax_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)


@_prefix_lm_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
    T, H, D = q.shape
    n_ids = 0 if uses_per_sample_kernels(max_seqlen, D, q.dtype) else T
    return (torch.empty_like(q), q.new_empty((H, T), dtype=torch.float32),
            q.new_empty((n_ids,), dtype=torch.int32))


@torch.library.custom_op("unigen::prefix_lm_attention_bwd", mutates_args=())
def _prefix_lm_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                                seq_id: torch.Tensor, max_seqlen: int, softmax_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(do, q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id, max_seqlen,
                          softmax_scale)


@_prefix_lm_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id, max_seqlen, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale = inputs
    out, lse, seq_id = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse, seq_id)


def _backward(ctx, grad_out, *unused_grads):
    dq, dk, dv = _prefix_lm_attention_bwd_op(grad_out.contiguous(), *ctx.saved_tensors,
                                             ctx.max_seqlen, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


_prefix_lm_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _PrefixLMAttentionFunction(torch.autograd.Function):
    """The same forward and backward for eager mode, without the custom-op dispatcher.

    At the decoder's sizes (~50k packed tokens, 12 heads, head_dim 64) the kernels of one
    forward + backward take a few hundred microseconds on a GPU, so host time counts: the
    custom-op path adds ~40 µs of dispatch per forward + backward (measured on CPU) and a
    zero-filled gradient for ``lse``. ``prefix_lm_attention`` takes the custom op while
    torch.compile traces and this Function otherwise; both run the same launchers."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
        inputs = (q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
        output = _forward_impl(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for lse and seq_id
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused_grads):
        q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id = ctx.saved_tensors
        dq, dk, dv = _backward_impl(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens,
                                    prefix_lens, seq_id, ctx.max_seqlen, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def _resolve(backend: str, q: torch.Tensor) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.is_cuda:
            if _HAS_TRITON and q.dtype in TRITON_DTYPES and q.shape[-1] <= TRITON_MAX_HEAD_DIM:
                return "triton"
            if flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16):
                return "flash_attn"
        # CPU (even under TRITON_INTERPRET=1, whose kernels are slow): SDPA on the padded batch
        # is the fastest exact portable path (B * L^2 scores instead of the reference's T^2).
        return "sdpa"
    if backend in ("triton", "cpp"):
        if backend == "cpp" or not _HAS_TRITON or not (q.is_cuda or triton_interpreting()):
            resolve_backend(backend, q.device, op=OP, has_cpp=False)  # raises the clear errors
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"{OP}: backend='triton' takes float16, bfloat16 or float32 q, k, v; "
                            f"got {str(q.dtype).replace('torch.', '')}")
        if q.shape[-1] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{OP}: backend='triton' supports head_dim <= {TRITON_MAX_HEAD_DIM}, "
                             f"got {q.shape[-1]}")
    if backend in ("flash_attn", "torch_varlen"):
        (_load_flash_attn_varlen if backend == "flash_attn" else _load_torch_varlen)()
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{OP}: backend={backend!r} needs float16/bfloat16 CUDA tensors, got "
                             f"{str(q.dtype).replace('torch.', '')} on {q.device.type}")
    return backend


def prefix_lm_attention(q, k, v, cu_seqlens, prefix_lens, *, max_seqlen, softmax_scale=None,
                        backend="auto", validate=None):
    """Packed variable-length prefix-LM attention.

    Args:
        q, k, v: ``[total_tokens, heads, head_dim]``, same shape, dtype and device
            (float16/bfloat16/float32; float64 on the PyTorch backends only).
        cu_seqlens: int32/int64 ``[B + 1]``: sample i spans ``cu_seqlens[i]:cu_seqlens[i+1]``;
            ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[-1] = total_tokens``.
        prefix_lens: int32/int64 ``[B]``, ``0 <= prefix_lens[i] <= len(sample i)``: the first
            ``prefix_lens[i]`` tokens of sample i attend each other bidirectionally; every later
            token attends the prefix and the tokens before it. 0 is plain causal attention.
        max_seqlen: Python int, at least the longest sample: the padded backends pad to it, and
            it picks the Triton path on the host (<= 128: the per-sample kernels, whose tile it
            sizes; they never read tokens of a sample past it, so with a too small value and
            ``validate=False`` those rows of the output and the gradients are NaN: the loss
            shows the error, nothing crashes or reads out of bounds).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: one of :data:`ATTENTION_BACKENDS`.
        validate: check the values: ``cu_seqlens``/``prefix_lens``/``max_seqlen`` (read on the
            host, never inside ``torch.compile``) and that the output is finite (a non-finite
            q, k or v reaches it; one reduction over the output, then on CPU a ValueError naming
            the argument, on CUDA or under compile a device-side assertion). ``None`` = on CPU
            tensors only, where it costs nothing; on CUDA the layout check would cost a device
            sync per call, so it is off unless asked for (the Triton kernels clamp every index, so
            bad values give wrong numbers, never a crash; non-finite inputs give a non-finite
            output). See docs/architecture.md, "Non-finite inputs".

    Autocast: under ``torch.autocast`` q, k and v are cast to the autocast dtype (as autocast casts
    ``scaled_dot_product_attention``'s), every backend then runs with autocast disabled (fp32
    softmax statistics as without autocast), and the output has the autocast dtype.

    Returns:
        ``[total_tokens, heads, head_dim]`` in the dtype of ``q`` (the autocast dtype under autocast).
    """
    if isinstance(q, torch.Tensor):
        q, k, v = cast_inputs(autocast_dtype(q.device), q, k, v)
    check_tensor(q, "q", op=OP, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", op=OP, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor(v, "v", op=OP, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{OP}: {name} must have the shape of q {tuple(q.shape)}, got "
                             f"{tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{OP}: {name} must have the dtype of q "
                            f"({str(q.dtype).replace('torch.', '')}), got "
                            f"{str(x.dtype).replace('torch.', '')}")
    check_tensor(cu_seqlens, "cu_seqlens", op=OP, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    check_tensor(prefix_lens, "prefix_lens", op=OP, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{OP}: the batch is empty: cu_seqlens must hold B + 1 >= 2 offsets (one "
                         f"sample or more), got shape {tuple(cu_seqlens.shape)} (prefix_lens "
                         f"{tuple(prefix_lens.shape)})")
    if prefix_lens.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"{OP}: cu_seqlens [B + 1] and prefix_lens [B] disagree: shapes "
                         f"{tuple(cu_seqlens.shape)} and {tuple(prefix_lens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{OP}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    elif not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"{OP}: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    softmax_scale = float(softmax_scale)
    T = q.shape[0]
    check_values = resolve_validate(validate, q.device, op=OP)
    # the layout's values are read on the host: never inside torch.compile (a graph break)
    if check_values and not _is_compiling():
        check_cu_seqlens(cu_seqlens, prefix_lens, T, max_seqlen=max_seqlen)

    be = _resolve(backend, q)
    with autocast_disabled(q.device):
        out = _dispatch(be, q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
    if check_values:
        check_finite_result(torch.isfinite(out.detach()).all(), op=OP, diagnose=lambda: name_non_finite(
            OP, [("q", q.detach()), ("k", k.detach()), ("v", v.detach())],
            "the output is not finite although q, k and v are: the scores overflow (softmax_scale?)"))
    return out


def _dispatch(be, q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
    T = q.shape[0]
    if be == "triton":
        # torch.compile traces the custom op; eager mode skips its dispatcher
        op = (_prefix_lm_attention_fwd_op if _is_compiling()
              else _PrefixLMAttentionFunction.apply)
        return op(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)[0]
    if be == "torch":
        return prefix_lm_attention_reference(q, k, v, cu_seqlens, prefix_lens, softmax_scale)
    if T == 0:
        return torch.empty_like(q)
    if be == "sdpa":
        return _sdpa_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
    if be == "flex":
        return _flex_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale)
    varlen_fn = _load_torch_varlen() if be == "torch_varlen" else None
    return _flash_attn_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale,
                               varlen_fn=varlen_fn)


class PrefixLMAttention(torch.nn.Module):
    """Module form of :func:`prefix_lm_attention` (holds the scale and the backend)."""

    def __init__(self, softmax_scale=None, backend="auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{OP}: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.softmax_scale = softmax_scale
        self.backend = backend

    def forward(self, q, k, v, cu_seqlens, prefix_lens, *, max_seqlen):
        return prefix_lm_attention(q, k, v, cu_seqlens, prefix_lens, max_seqlen=max_seqlen,
                                   softmax_scale=self.softmax_scale, backend=self.backend)

    def extra_repr(self):
        return f"softmax_scale={self.softmax_scale}, backend={self.backend!r}"
