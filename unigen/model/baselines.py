"""Naive counterparts of the fused pieces, as public code bases compute them.

They are the baseline of the end-to-end benchmark (``UniGenConfig.with_naive_baselines()``) and
an independent cross-check of the fused paths in tests:

- :func:`materialized_cross_entropy_per_task`: the full ``[N, V]`` logits, then one
  ``F.cross_entropy`` per task (what a straightforward multi-task model does).
- :func:`lavis_contrastive_loss`: the ALBEF/BLIP/BLIP-2 (LAVIS) recipe: dense similarity matrices,
  ``F.cross_entropy`` both ways, then hard negatives drawn row by row with ``torch.multinomial``
  in a Python loop (one device sync per row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unigen.kernels import ContrastiveLossOutput


def materialized_cross_entropy_per_task(hidden: torch.Tensor, weight: torch.Tensor,
                                        labels: torch.Tensor, task_of_row: torch.Tensor,
                                        num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task mean cross-entropy with materialised logits.

    Returns ``(means [num_tasks], counts [num_tasks])``; a task without rows has mean 0.
    """
    logits = F.linear(hidden, weight).float()  # [N, V]: the memory the fused op avoids
    means, counts = [], []
    for t in range(num_tasks):
        sel = task_of_row == t
        n = int(sel.sum())
        counts.append(n)
        means.append(F.cross_entropy(logits[sel], labels[sel]) if n else logits.sum() * 0.0)
    return torch.stack(means), torch.tensor(counts, device=hidden.device)


def lavis_contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale,
                           *, ids: torch.Tensor | None = None, label_smoothing: float = 0.0,
                           negatives: str | None = "sample",
                           generator: torch.Generator | None = None) -> ContrastiveLossOutput:
    """InfoNCE + hard-negative mining as LAVIS's ALBEF/BLIP models do it (single process).

    Same contract as :func:`unigen.kernels.contrastive_loss` (``ids`` marks positives; negatives
    are indices, -1 when a row has none), computed the naive way.
    """
    if image_feats.shape != text_feats.shape or image_feats.dim() != 2 or image_feats.shape[0] == 0:
        raise ValueError(f"lavis_contrastive_loss: image_feats and text_feats must be non-empty "
                         f"[B, D] of one shape, got {tuple(image_feats.shape)} and "
                         f"{tuple(text_feats.shape)}")
    img = F.normalize(image_feats.float(), dim=-1)
    txt = F.normalize(text_feats.float(), dim=-1)
    sim_i2t = logit_scale * img @ txt.t()
    sim_t2i = logit_scale * txt @ img.t()
    n = img.shape[0]
    if ids is None:
        ids = torch.arange(n, device=img.device)
    pos = ids.view(-1, 1) == ids.view(1, -1)
    targets = pos.float() / pos.float().sum(1, keepdim=True)
    if label_smoothing:
        targets = (1 - label_smoothing) * targets + label_smoothing / n
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(sim_t2i, dim=1) * targets).sum(1).mean()
    loss = (loss_i2t + loss_t2i) / 2
    if negatives is None:
        return ContrastiveLossOutput(loss, None, None)

    with torch.no_grad():
        # LAVIS: weights = softmax(sim) with the positives zeroed, then one multinomial per row.
        w_i2t = F.softmax(sim_i2t.detach(), dim=1).masked_fill(pos, 0.0)
        w_t2i = F.softmax(sim_t2i.detach(), dim=1).masked_fill(pos, 0.0)

        def mine(w: torch.Tensor) -> torch.Tensor:
            out = []
            for b in range(n):
                row = w[b]
                if not bool((row > 0).any()):
                    # Every candidate is a positive (or underflowed): fall back to the
                    # non-positives by similarity rank, -1 when there is none at all.
                    cand = (~pos[b]).nonzero().view(-1)
                    out.append(int(cand[0]) if cand.numel() else -1)
                elif negatives == "hardest":
                    out.append(int(row.argmax()))
                else:
                    out.append(int(torch.multinomial(row, 1, generator=generator)))
            return torch.tensor(out, dtype=torch.long, device=img.device)

        return ContrastiveLossOutput(loss, mine(w_i2t), mine(w_t2i))
