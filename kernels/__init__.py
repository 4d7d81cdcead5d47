"""Fused ops of UniGen (installed as ``unigen.kernels``).

Every op takes ``backend=`` one of ``"auto"``, ``"triton"``, ``"torch"``, ``"cpp"``
(see :mod:`unigen.kernels._backend`).
"""

if __name__ != "unigen.kernels":
    # This folder installs as the subpackage `unigen.kernels`. With a checkout's root on
    # sys.path (`python -m ...` run there), `import kernels` — transformers probes for PyPI's
    # `kernels` package that way — finds this folder instead. Registering every torch.library op
    # a second time under that name corrupts the op registry, so the module stays an empty
    # shadow here; without a __file__ it reads as "not installed" to such probes.
    __file__ = None
else:
    from ._backend import BACKENDS, triton_available
    from .clip_loss import ClipLoss
    from .contrastive_loss import ContrastiveLoss, ContrastiveLossOutput, contrastive_loss
    from .fused_linear_cross_entropy import (
        FusedLinearCrossEntropyLoss,
        fused_linear_cross_entropy,
    )
    from .hf_patch import SUPPORTED_MODEL_TYPES, patch_hf_model, patched_hf_model, unpatch_hf_model
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
    # drop-in API for other models (transformers is imported only when a model is patched)
    "patch_hf_model",
    "unpatch_hf_model",
    "patched_hf_model",
    "SUPPORTED_MODEL_TYPES",
    "ClipLoss",
]
