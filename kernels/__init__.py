"""Fused ops of UniGen (installed as ``unigen.kernels``).

Every op takes ``backend=`` one of ``"auto"``, ``"triton"``, ``"torch"``, ``"cpp"``
(see :mod:`unigen.kernels._backend`).
"""

from ._backend import BACKENDS, triton_available
from .fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    fused_linear_cross_entropy,
)

__all__ = [
    "BACKENDS",
    "triton_available",
    "fused_linear_cross_entropy",
    "FusedLinearCrossEntropyLoss",
]
