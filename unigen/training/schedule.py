"""Learning-rate schedule: linear warm-up, then linear (paper §4.2), cosine or constant decay.

Step ``s`` counts optimizer steps from 0. Warm-up rises linearly so that step
``warmup_steps - 1`` runs at the peak ``optim.lr``; the decay then reaches
``min_lr_ratio · lr`` exactly at the last step ``steps - 1``. The schedule is a pure function
of the step, so resuming needs nothing but the step.
"""

from __future__ import annotations

import math

import torch

from .config import ScheduleConfig


def lr_multiplier(step: int, cfg: ScheduleConfig) -> float:
    """The factor on ``optim.lr`` at optimizer step ``step`` (0-based)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"lr_multiplier: step must be an int >= 0, got {step!r}")
    warmup, total = cfg.warmup_steps, cfg.steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.decay == "constant" or total == warmup:
        return 1.0
    # (s - warmup + 1) / (total - warmup): just under 1 right after warm-up, 1 at the last step
    progress = min(1.0, (step - warmup + 1) / (total - warmup))
    if cfg.decay == "linear":
        shape = 1.0 - progress
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer,
                    cfg: ScheduleConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_multiplier`: call ``scheduler.step()`` after each
    ``optimizer.step()``; the optimizer's lr for step ``s`` is then ``lr · lr_multiplier(s)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))
