"""The autocast rule shared by every op in :mod:`unigen.kernels`.

Under ``torch.autocast`` an op behaves as the PyTorch computation it fuses would:

- its matmul inputs (``fused_linear_cross_entropy``'s hidden/weight/bias, ``contrastive_loss``'s
  features, ``prefix_lm_attention``'s q/k/v) are cast to the autocast dtype at entry, as autocast
  casts the inputs of ``F.linear``/``matmul``/``scaled_dot_product_attention`` (float64 tensors are
  left alone, as autocast leaves them);
- inside, the op keeps its own precision rules (fp32 accumulation and softmax statistics): the
  kernels and the PyTorch reference run with autocast disabled, so no matmul inside them is
  silently re-cast (which is what made the reduced cross-entropy fail: its fp32 buffers received
  bf16 blocks);
- the losses come back in fp32, as autocast runs ``cross_entropy`` in fp32; attention output comes
  back in the autocast dtype, as ``scaled_dot_product_attention``'s.

Casting at entry (rather than a dispatcher-level autocast kernel) keeps the casts visible to
autograd (the fp32 leaves receive fp32 gradients) and to torch.compile, which traces them as
ordinary ``.to`` nodes.
"""

from __future__ import annotations

import contextlib
import functools

import torch

# Device types autocast knows and our ops run on.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The active autocast dtype for tensors on ``device``, or None when autocast is off there."""
    if device.type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def cast_inputs(dtype: torch.dtype | None, *tensors):
    """``tensors`` cast to ``dtype`` as autocast casts a lower-precision op's inputs (floating,
    not float64; None passes through). No-op when ``dtype`` is None."""
    if dtype is None:
        return tensors
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                 and x.dtype != torch.float64 else x for x in tensors)


def autocast_disabled(device: torch.device):
    """A context in which no op re-casts its inputs (the ops' own dtype rules hold)."""
    if device.type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def autocast_free(fn):
    """Run ``fn`` (an op body: kernels and reference math) with autocast disabled on the device of
    its first tensor argument."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with autocast_disabled(device):
            return fn(*args, **kwargs)
    return wrapper
