"""AdamW over the trainable parameters (paper §4.2) and the autocast dtype."""

from __future__ import annotations

import torch

from .config import OptimConfig, RunConfig


def trainable_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on matrices, none on 1-D parameters (biases,
    norm scales, the temperature): the nanoGPT/CLIP rule."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig,
                    device: torch.device) -> torch.optim.AdamW:
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(trainable_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=cfg.betas, eps=cfg.eps, **kwargs)


def autocast_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 for "bf16" (and "auto" on GPUs), None (no autocast) for fp32."""
    p = cfg.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None
