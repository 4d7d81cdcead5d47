"""Fused ops of UniGen: the public surface of the top-level ``kernels/`` folder.

The ops' code lives in the checkout's top-level ``kernels/`` folder, one folder per op, and is
importable only as ``unigen.kernels.<folder>``: ``kernels/`` has no ``__init__.py``, so it is never
a top-level ``kernels`` package that would shadow PyPI's ``kernels`` (which transformers imports)
when Python runs from the checkout's root (docs/architecture.md, "Why kernels/ is not a
package"). An install maps each op folder here (setup.py); a checkout used without an install
(``PYTHONPATH=<checkout>``, as on the GPU machine) finds them through ``__path__`` below.

Every op takes ``backend=`` one of ``"auto"``, ``"triton"``, ``"torch"``, ``"cpp"``
(see :mod:`unigen.kernels.common.backend`).
"""

import os as _os


def _checkout_kernels_folder() -> list[str]:
    """The checkout's ``kernels/`` folder when this file is ``<checkout>/unigen/kernels/__init__.py``.

    Both marks are checked so that an installed copy (``site-packages/unigen/kernels``) never
    reads ``site-packages/kernels``, which is PyPI's package of that name.
    """
    checkout = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
    folder = _os.path.join(checkout, "kernels")
    marks = (_os.path.join(checkout, "setup.py"), _os.path.join(folder, "common", "backend.py"))
    return [folder] if all(_os.path.isfile(m) for m in marks) else []


__path__ += [p for p in _checkout_kernels_folder() if p not in __path__]  # noqa: F821 (a package's own)

from .common.backend import BACKENDS, triton_available  # noqa: E402
from .contrastive_loss import ContrastiveLoss, ContrastiveLossOutput, contrastive_loss  # noqa: E402
from .dropin.clip_loss import ClipLoss  # noqa: E402
from .dropin.hf_patch import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    patch_hf_model,
    patched_hf_model,
    read_hf_model,
    unpatch_hf_model,
)
from .fused_linear_cross_entropy import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy  # noqa: E402
from .prefix_lm_attention import PrefixLMAttention, prefix_lm_attention  # noqa: E402

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
    # drop-in API for other models (transformers is imported only when a model is patched)
    "patch_hf_model",
    "unpatch_hf_model",
    "patched_hf_model",
    "read_hf_model",
    "SUPPORTED_MODEL_TYPES",
    "ClipLoss",
]
