"""Fused ops of UniGen (installed as ``unigen.kernels``).

Every op takes ``backend=`` one of ``"auto"``, ``"triton"``, ``"torch"``, ``"cpp"``
(see :mod:`unigen.kernels._backend`).
"""

from ._backend import BACKENDS, triton_available
from .contrastive_loss import ContrastiveLoss, ContrastiveLossOutput, contrastive_loss
from .fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    fused_linear_cross_entropy,
)
from .prefix_lm_attention import PrefixLMAttention, prefix_lm_attention

__all__ = [
    "BACKENDS",
    "triton_available",
    "fused_linear_cross_entropy",
    "FusedLinearCrossEntropyLoss",
    "contrastive_loss",
    "ContrastiveLoss",
    "ContrastiveLossOutput",
    "prefix_lm_attention",
    "PrefixLMAttention",
]
