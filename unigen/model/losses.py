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
import torch.nn.functional as F

from unigen.kernels import contrastive_loss, fused_linear_cross_entropy
from unigen.model.baselines import lavis_contrastive_loss, materialized_cross_entropy_per_task
from unigen.model.config import TASK_NAMES, LossConfig
from unigen.model.host_collectives import all_gather_host_ints

# The ops' finiteness checks stay off inside the model, on CPU as on a GPU: its inputs are
# activations, and a non-finite one is a diverging run, which the trainer reports on the loss
# with the step and the remedy (the batch's own values are checked by UniGenBatch.validate).
OPS_VALIDATE = False


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
    # index_add, not bincount: CUDA's bincount reads the input's max on the host (a sync).
    counts = torch.zeros(n_tasks, dtype=torch.long, device=hidden.device).index_add_(
        0, task_of_row, torch.ones_like(task_of_row))
    row_weight = (1.0 / counts.clamp(min=1).to(torch.float32))[task_of_row]
    rows = fused_linear_cross_entropy(hidden, weight, labels, token_weights=row_weight.to(hidden.dtype),
                                      reduction="none", backend=cfg.kernel_backend,
                                      validate=OPS_VALIDATE)
    means = torch.zeros(n_tasks, dtype=torch.float32, device=hidden.device).index_add(
        0, task_of_row, rows.float())
    return (coef * means).sum(), means, counts


def contrastive(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor,
                ids: torch.Tensor, cfg: LossConfig, generator: torch.Generator | None = None):
    """L_CL and the mined hard negatives (fused op or the LAVIS-style baseline)."""
    negatives = None if cfg.hard_negatives in ("none", "uniform") else cfg.hard_negatives
    if cfg.contrastive == "naive":
        return lavis_contrastive_loss(image_feats, text_feats, logit_scale, ids=ids,
                                      label_smoothing=cfg.contrastive_label_smoothing,
                                      negatives=negatives, generator=generator)
    return contrastive_loss(image_feats, text_feats, logit_scale, ids=ids,
                            label_smoothing=cfg.contrastive_label_smoothing, negatives=negatives,
                            generator=generator, backend=cfg.kernel_backend,
                            validate=OPS_VALIDATE)


@dataclass
class PairLoss:
    """L_CL of a step's image-text pairs and this process's mined hard negatives."""

    loss: torch.Tensor
    """L_CL (0-d; 0 when no negative exists)."""
    neg_text_for_image: torch.Tensor | None
    """Per local pair, the local pair whose text is its mined negative text; -1 exactly where the
    pair has no non-positive local candidate. None when nothing was mined."""
    neg_image_for_text: torch.Tensor | None
    """Likewise for the negative image of each local pair's text."""


def _process_group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def mine_local_negatives(image_feats: torch.Tensor, text_feats: torch.Tensor,
                         logit_scale: torch.Tensor, pair_ids: torch.Tensor, mode: str,
                         generator: torch.Generator | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives among this process's ``P`` pairs, with the fused op's law: for image i a
    text j drawn ∝ softmax_j(s_ij) over the non-positives (``pair_ids`` differ), s = logit_scale ·
    cos; for text i an image likewise over s_ji; ``mode="hardest"`` takes the argmax,
    ``mode="uniform"`` draws uniformly among the non-positives (the similarity is not read).

    Returns two int64 ``[P]`` local indices, -1 where every pair is a positive of the row. All on
    the device (Gumbel-max draw, no host sync); a ``P × P`` similarity, no gradient.
    """
    v = F.normalize(image_feats.detach().float(), dim=-1)
    t = F.normalize(text_feats.detach().float(), dim=-1)
    s = logit_scale.detach().float() * (v @ t.t())
    positive = pair_ids[:, None] == pair_ids[None, :]
    no_candidate = positive.all(1)

    def draw(sim: torch.Tensor) -> torch.Tensor:
        if mode == "uniform":
            sim = torch.zeros_like(sim)
        if mode in ("sample", "uniform"):
            # argmax(s + Gumbel) is an exact draw from softmax(s); Gumbel = -log(Exp(1)).
            sim = sim - torch.empty_like(sim).exponential_(generator=generator).log()
        idx = sim.masked_fill(positive, float("-inf")).argmax(1)
        return torch.where(no_candidate, torch.full_like(idx, -1), idx)

    return draw(s), draw(s.t())


def pair_contrastive(image_feats: torch.Tensor, text_feats: torch.Tensor,
                     logit_scale: torch.Tensor, pair_ids: torch.Tensor, cfg: LossConfig,
                     generator: torch.Generator | None = None) -> PairLoss:
    """L_CL over the pairs of this process (``[P, C]`` features, ``P`` may be 0) — and, under
    ``torch.distributed``, of every process: the data-parallel bookkeeping lives here, not in
    the model's forward.

    With more than one process the fused op all-gathers every process's pairs and each
    process's loss is weighted so that the processes' mean L_CL — what DDP's gradient average
    sees — is the one-process loss of the global batch, even with uneven pair counts. Pair ids
    are numbered per batch, so each process's are offset by ``rank · 2^32`` (else two
    processes' pair 0 would count as positives of each other); a process without pairs still
    joins the gathers with empty features.

    The hard negatives are mined among this process's own pairs (ALBEF's choice; with one
    process that is the whole batch): every pair that has a non-positive local pair gets both
    its negatives, on any number of processes, and the [match] samples built from them read
    only encoder outputs this process holds — no second gather of the 32-query image prefixes
    and the text prefixes, with gradient, for the mined pairs (BLIP-2's way). The price is a
    candidate pool of the local pairs (64 on 8 GPUs at batch 512) instead of the global batch;
    docs/model.md has the measured cost of both. The naive baseline's L_CL stays local.
    With one process and fewer than 2 pairs no negative exists: L_CL is 0, nothing is mined.
    """
    world = _process_group_size()
    num_pairs = image_feats.shape[0]
    mode = None if cfg.hard_negatives == "none" else cfg.hard_negatives
    if world > 1:
        dist = torch.distributed
        global_ids = pair_ids + dist.get_rank() * (1 << 32)
        if cfg.contrastive == "fused":
            # Every rank's pair count, exchanged between the hosts (a gloo message, no device
            # read): the op then gathers the features without reading sizes back itself.
            sizes = all_gather_host_ints(num_pairs)
            loss = contrastive_loss(image_feats, text_feats, logit_scale, ids=global_ids,
                                    label_smoothing=cfg.contrastive_label_smoothing,
                                    negatives=None, backend=cfg.kernel_backend,
                                    rank_sizes=sizes, validate=OPS_VALIDATE).loss
            # The op's loss is the mean over this rank's rows; weighted by n_local · W / N the
            # ranks' mean (what DDP's gradient average sees) is the global batch's mean also
            # when the ranks hold different numbers of pairs.
            loss = loss * (num_pairs * world / max(sum(sizes), 1))
            if mode is None or num_pairs == 0:
                return PairLoss(loss, None, None)
            return PairLoss(loss, *mine_local_negatives(image_feats, text_feats, logit_scale,
                                                         pair_ids, mode, generator))
    if num_pairs == 0 or (num_pairs == 1 and world == 1):
        return PairLoss(logit_scale * 0.0, None, None)
    out = contrastive(image_feats, text_feats, logit_scale, pair_ids, cfg, generator)
    if mode == "uniform":
        return PairLoss(out.loss, *mine_local_negatives(image_feats, text_feats, logit_scale,
                                                         pair_ids, mode, generator))
    return PairLoss(out.loss, out.neg_text_for_image, out.neg_image_for_text)
