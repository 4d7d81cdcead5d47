"""The readable reference of the fused contrastive loss (single process, dense B×B, autograd;
what the tests trust), the op's output type, and what every implementation shares: the
normalisation's eps and the math dtype (fp64 for fp64 inputs, fp32 otherwise)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

_OP = "contrastive_loss"
# Feature normalisation as in F.normalize: x / max(||x||, eps).
_NORM_EPS = 1e-12


class ContrastiveLossOutput(NamedTuple):
    """``loss``: 0-d tensor. ``neg_text_for_image[i]``: index (into the gathered batch) of the hard
    negative text of local image i, -1 when every text is a positive of image i; likewise
    ``neg_image_for_text``. Both are None with ``negatives=None``."""

    loss: torch.Tensor
    neg_text_for_image: Optional[torch.Tensor]
    neg_image_for_text: Optional[torch.Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def contrastive_loss_reference(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    logit_scale,
    *,
    ids: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    negatives: Optional[str] = "sample",
    generator: Optional[torch.Generator] = None,
) -> ContrastiveLossOutput:
    """Plain PyTorch (autograd) version of :func:`contrastive_loss` on one process.

    Computes in fp32 (fp64 for fp64 inputs). Mining samples with ``torch.multinomial`` over the
    softmax of the similarity restricted to the non-positives (one batched call, no Python loop).
    """
    acc = torch.float64 if image_feats.dtype == torch.float64 else torch.float32
    a = F.normalize(image_feats.to(acc), dim=-1, eps=_NORM_EPS)
    b = F.normalize(text_feats.to(acc), dim=-1, eps=_NORM_EPS)
    scale = torch.as_tensor(logit_scale, dtype=acc, device=a.device)
    logits = scale * (a @ b.t())  # [images, texts]
    n = logits.shape[0]
    if ids is None:
        ids = torch.arange(n, device=a.device)
    pos = ids.view(-1, 1) == ids.view(1, -1)  # symmetric: pos[i, j] == pos[j, i]
    targets = pos.to(acc) / pos.sum(1, keepdim=True).to(acc)
    targets = (1.0 - label_smoothing) * targets + label_smoothing / n
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    loss = 0.5 * (loss_i2t + loss_t2i)
    if negatives is None:
        return ContrastiveLossOutput(loss, None, None)
    sim = logits.detach()

    def mine(s):
        masked = s.masked_fill(pos, float("-inf"))
        has_negative = ~pos.all(1)
        if negatives == "hardest":
            idx = masked.argmax(1)
        else:
            # softmax over the non-positives only: no underflow to an all-zero row, and rows without
            # any candidate get a dummy uniform row (their draw is discarded below).
            weights = torch.softmax(masked, dim=1)
            weights = torch.where(has_negative.view(-1, 1), weights, torch.ones_like(weights))
            idx = torch.multinomial(weights, 1, generator=generator).view(-1)
        return torch.where(has_negative, idx, torch.full_like(idx, -1))

    return ContrastiveLossOutput(loss, mine(sim), mine(sim.t()))
