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

from dataclasses import dataclass

import torch

from unigen.kernels import contrastive_loss, fused_linear_cross_entropy
from unigen.model.baselines import lavis_contrastive_loss, materialized_cross_entropy_per_task
from unigen.model.config import TASK_NAMES, LossConfig


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


@dataclass
class PairLoss:
    """L_CL of a step's image-text pairs and this process's mined hard negatives."""

    loss: torch.Tensor
    """L_CL (0-d; 0 when no negative exists)."""
    neg_text_for_image: torch.Tensor | None
    """Per local pair, the local pair whose text is its mined negative text; -1 where none was
    mined or the negative is another process's pair. None when nothing was mined."""
    neg_image_for_text: torch.Tensor | None
    """Likewise for the negative image of each local pair's text."""


def _process_group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def pair_contrastive(image_feats: torch.Tensor, text_feats: torch.Tensor,
                     logit_scale: torch.Tensor, pair_ids: torch.Tensor, cfg: LossConfig,
                     generator: torch.Generator | None = None) -> PairLoss:
    """L_CL over the pairs of this process (``[P, C]`` features, ``P`` may be 0) — and, under
    ``torch.distributed``, of every process: the data-parallel bookkeeping lives here, not in
    the model's forward.

    With more than one process the fused op all-gathers every process's pairs (negatives come
    from the global batch). Pair ids are numbered per batch, so each process's are offset by
    ``rank · 2^32`` (else two processes' pair 0 would count as positives of each other); a
    process without pairs still joins the gathers with empty features; and the op's mined
    indices, which address the gathered batch, are mapped back to this process's pairs through
    its offset there (one all-gather of the pair counts). The naive baseline stays local.
    With one process and fewer than 2 pairs no negative exists: L_CL is 0, nothing is mined.
    """
    world = _process_group_size()
    num_pairs = image_feats.shape[0]
    offset = 0  # where this process's pairs start in the batch the fused op gathers
    if world > 1:
        dist = torch.distributed
        pair_ids = pair_ids + dist.get_rank() * (1 << 32)
        if cfg.contrastive == "fused":
            sizes = [torch.zeros(1, dtype=torch.long, device=pair_ids.device)
                     for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([num_pairs], dtype=torch.long,
                                                device=pair_ids.device))
            offset = int(sum(sizes[:dist.get_rank()]))
            if num_pairs == 0:
                return PairLoss(contrastive(image_feats, text_feats, logit_scale, pair_ids, cfg,
                                            generator).loss, None, None)
    if num_pairs == 0 or (num_pairs == 1 and world == 1):
        return PairLoss(logit_scale * 0.0, None, None)
    out = contrastive(image_feats, text_feats, logit_scale, pair_ids, cfg, generator)
    if out.neg_text_for_image is None:
        return PairLoss(out.loss, None, None)

    def local(neg: torch.Tensor) -> torch.Tensor:
        rows = neg.long() - offset
        return torch.where((neg >= 0) & (rows >= 0) & (rows < num_pairs), rows,
                           torch.full_like(rows, -1))

    return PairLoss(out.loss, local(out.neg_text_for_image), local(out.neg_image_for_text))
