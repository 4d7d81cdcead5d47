"""The five losses of UniGen (paper §3.3) and the switch between fused ops and naive baselines.

    L = L_trans + L_cap + α·L_qus + β·L_match + L_CL

The four generative terms are each the mean over their own target tokens. On the fused path all
of them come from ONE call of :func:`unigen.kernels.fused_linear_cross_entropy` over every target
row of the packed batch, with per-row weights ``1 / n_tokens(task)``: the rows' weighted losses
summed per task are exactly the per-task means (kept separately for logging), and the weighted
sum with the task coefficients is the objective. The naive path materialises the logits and
calls ``F.cross_entropy`` per task.
"""

from __future__ import annotations

import torch

from unigen.model.config import TASK_NAMES, LossConfig
from unigen.kernels import contrastive_loss, fused_linear_cross_entropy
from unigen.model.baselines import lavis_contrastive_loss, materialized_cross_entropy_per_task


def task_coefficients(cfg: LossConfig, device) -> torch.Tensor:
    """[4] coefficients of (trans, cap, qus, match): 1, 1, α, β in the paper."""
    return torch.tensor([cfg.task_weight(t) for t in TASK_NAMES], dtype=torch.float32,
                        device=device)


def generative_losses(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                      task_of_row: torch.Tensor, cfg: LossConfig
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-task mean cross-entropy of the target rows.

    hidden [N, D] (decoder states at the positions that predict a target token), weight [V, D]
    (the tied LM head), labels [N], task_of_row [N] (task id per row).
    Returns ``(weighted_total, per_task_means [4], per_task_counts [4])``; a task without rows
    has mean 0 and contributes 0.
    """
    n_tasks = len(TASK_NAMES)
    coef = task_coefficients(cfg, hidden.device)
    if weight.dtype != hidden.dtype:
        # Mixed precision: the decoder's states come out in the autocast dtype while the tied
        # head is an fp32 parameter; the op wants one dtype (the cast is differentiable).
        weight = weight.to(hidden.dtype)
    if hidden.shape[0] == 0:
        zero = weight.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
        return zero, torch.zeros(n_tasks, device=hidden.device), torch.zeros(
            n_tasks, dtype=torch.long, device=hidden.device)
    if cfg.cross_entropy == "naive":
        means, counts = materialized_cross_entropy_per_task(hidden, weight, labels, task_of_row,
                                                            n_tasks)
        return (coef * means).sum(), means, counts
    counts = torch.bincount(task_of_row, minlength=n_tasks)
    row_weight = (1.0 / counts.clamp(min=1).to(torch.float32))[task_of_row]
    rows = fused_linear_cross_entropy(hidden, weight, labels, token_weights=row_weight.to(hidden.dtype),
                                      reduction="none", backend=cfg.kernel_backend)
    means = torch.zeros(n_tasks, dtype=torch.float32, device=hidden.device).index_add(
        0, task_of_row, rows.float())
    return (coef * means).sum(), means, counts


def contrastive(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor,
                ids: torch.Tensor, cfg: LossConfig, generator: torch.Generator | None = None):
    """L_CL and the mined hard negatives (fused op or the LAVIS-style baseline)."""
    negatives = None if cfg.hard_negatives == "none" else cfg.hard_negatives
    if cfg.contrastive == "naive":
        return lavis_contrastive_loss(image_feats, text_feats, logit_scale, ids=ids,
                                      label_smoothing=cfg.contrastive_label_smoothing,
                                      negatives=negatives, generator=generator)
    return contrastive_loss(image_feats, text_feats, logit_scale, ids=ids,
                            label_smoothing=cfg.contrastive_label_smoothing, negatives=negatives,
                            generator=generator, backend=cfg.kernel_backend)
