"""Argument checking of :func:`fused_linear_cross_entropy`: every bad input fails loudly with
the argument's name; the target range is checked on the host on CPU and by a device assertion on
CUDA and under torch.compile (no host sync, no graph break)."""

from __future__ import annotations

import math

import torch

from ..common.checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

OP = "fused_linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")


def _check_inputs(hidden, weight, target, bias, token_weights, ignore_index, label_smoothing,
                  z_loss, reduction, softcap=0.0, vocab=None):
    """``vocab``: the number of classes when ``weight`` is one rank's slice of them."""
    check_tensor(hidden, "hidden", op=OP, dtypes=FLOAT_DTYPES)
    check_tensor(weight, "weight", op=OP, ndim=2, dtypes=FLOAT_DTYPES, device=hidden.device)
    check_tensor(target, "target", op=OP, dtypes=INDEX_DTYPES, device=hidden.device)
    if hidden.dim() < 1:
        raise ValueError(f"{OP}: hidden must have shape [..., D], got a scalar")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    rows, dim = weight.shape
    if hidden.shape[-1] != dim:
        raise ValueError(f"{OP}: hidden has last dimension {hidden.shape[-1]} but weight is "
                         f"[V={rows}, D={dim}]")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{OP}: target shape {tuple(target.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if bias is not None:
        check_tensor(bias, "bias", op=OP, ndim=1, dtypes=FLOAT_DTYPES, device=hidden.device)
        if bias.shape[0] != rows:
            raise ValueError(f"{OP}: bias has {bias.shape[0]} entries, weight has V={rows} rows")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{OP}: bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    if token_weights is not None:
        check_tensor(token_weights, "token_weights", op=OP, dtypes=FLOAT_DTYPES, device=hidden.device)
        if tuple(token_weights.shape) != tuple(target.shape):
            raise ValueError(f"{OP}: token_weights shape {tuple(token_weights.shape)} must equal "
                             f"target shape {tuple(target.shape)}")
    if target.numel() == 0:
        raise ValueError(f"{OP}: empty batch (target has no elements)")
    if (rows == 0 and vocab is None) or dim == 0:
        raise ValueError(f"{OP}: weight must be non-empty, got shape {tuple(weight.shape)}")
    vocab = rows if vocab is None else vocab
    if reduction not in REDUCTIONS:
        raise ValueError(f"{OP}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{OP}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (isinstance(z_loss, (int, float)) and z_loss >= 0.0 and math.isfinite(z_loss)):
        raise ValueError(f"{OP}: z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and softcap >= 0.0 and math.isfinite(softcap)):
        raise ValueError(f"{OP}: softcap must be None or a finite float >= 0 (0 = no cap), got {softcap!r}")
    if not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_target_range(target, vocab, ignore_index)


def _check_target_range(target, vocab, ignore_index):
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    msg = f"{OP}: target values must be in [0, {vocab}) or equal ignore_index={ignore_index}"
    if target.device.type == "cuda" or torch.compiler.is_compiling():
        # A host check would sync (or break the graph); the device assert fails with this message.
        torch._assert_async(~bad.any(), msg)
    elif bool(bad.any()):
        position = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{msg}; got {target[position].item()} at position {position}")
