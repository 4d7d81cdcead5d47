"""Fused symmetric InfoNCE (CLIP / ALBEF contrastive loss) with on-device hard-negative mining.

UniGen's L_CL (paper §3.3) is the symmetric InfoNCE between the image [CLS] and the text [CLS]:

    L_CL = (L_v2t + L_t2v) / 2,   L_v2t = -1/B Σ_i log softmax_j(s_ij)[i],   s_ij = scale · cos(v_i, t_j)

and the image-text matching task ([match]) needs, for every image, a hard negative text and, for
every text, a hard negative image, drawn ∝ softmax(s) over the non-positives (ALBEF / BLIP).

Generalisations implemented here (all of them reduce to the formula above by default):

- ``ids``: every pair sharing an id is a positive. The target of row i is uniform over its positives
  P_i (BLIP's retrieval loss: ``sim_targets = pos / pos.sum(1)``), and positives are never mined.
- ``label_smoothing`` ε: target = (1-ε)·uniform(P_i) + ε·uniform(all columns), exactly
  ``F.cross_entropy(..., label_smoothing=ε)`` when ``ids`` is None.
- distributed: features are all-gathered with gradient; each rank computes the loss of its local rows
  against the global batch (open_clip's ``local_loss=True, gather_with_grad=True``).

The Triton path runs both directions (image rows × text columns and text rows × image columns)
in the same launches, on a (row blocks, 2, splits) grid. The forward is one sweep per row block
(split over several programs when the row blocks alone would leave the GPU idle; see
``_splits``) that produces the row loss, the log-sum-exp and the mined negative (weighted
reservoir sampling on the fly from the online sums, so mining costs no extra pass and no B×B
buffer; see ``_fwd_kernel``). The backward recomputes the
similarity tiles from the saved log-sum-exp. In one process it is one sweep over the rows of
each direction: s_ij is the same logit in both losses, so each tile's gradient takes both terms
and the image-row sweep yields the whole image gradient, the text-row sweep the whole text
gradient, each with its direction's part of the logit_scale gradient (``_rows_bwd_kernel``). Distributed, a rank holds
only its rows' statistics, so a column sweep per direction adds the gradient of the gathered
columns; it recomputes the transposed tile instead of sharing it with the row sweep: sharing
would need a cross-program reduction (atomics, or an O(B²/BLOCK) partial buffer), and
recomputing a [64, D] × [D, 32] tile costs less than either. Nothing of size B×B is ever
stored: extra memory is O(B·D).

Accounting (one process, B = 4096, D = 256, bf16, 64×32 tiles at 8 warps: the smallest whose
dots compile to Hopper's wgmma, see ``launch._launch_config``; 8 splits; per step = forward
with ``negatives="sample"`` + backward):

- FLOPs: forward 2·2·B²·D = 17.2 G on the tensor cores (both directions), backward 2× that
  (tile recompute + gradient matmul per direction). Per logit the forward adds one exp, and per
  tile row: without ids or smoothing 2 row reductions (max, mass; "hardest" takes the argmax
  with the max), sampling 3 and one scan (max, cumulative weights, the in-tile pick's count);
  ids add 4 (the positives' max, mass, logit sum, count), label smoothing 1 (the logit sum).
  It was one Philox call per 4 logits, 2 logs + 1 exp per logit and 7 reductions per tile row
  whatever the call needed. Random numbers: one Philox call per (row, column tile) and one per
  (row, split) in the merge: 2·B·(B/32 + 8) ≈ 1.1 M calls instead of 2·B²/4 = 8.4 M. Without ids
  the positive logit s_ii is one indexed dot per row: 2·B·D FLOPs per direction, not a masked
  sum over every tile.
- Bytes: the features are read from HBM once per sweep (2·B·D·2 = 4 MiB) and re-read from L2 per
  row block (B/64 · B·D·2 = 128 MiB per direction and sweep, half what the former 32-row tile
  cost); the forward's partial statistics are (2 + 1) planes without ids or smoothing (2 + 4 + 1
  with both) × splits × 2·B fp32, plus the int64 candidate per split: 0.8 + 0.5 MiB at
  B = 4096; the backward's per-split fp32 gradients 8 × 2·B·D·4 = 64 MiB, written and read once.
  Saved for the backward: lse, |P| and the inverse norms, O(B).
- Launches (CUDA): forward = the seed's randint (sampling only), ``_prep_kernel`` (norms and
  input check), ``_fwd_kernel``, ``_fwd_finish_kernel`` (split merge, loss, and the input
  check's reduction) and the check's ``_assert_async``: 5; backward = ``_rows_bwd_kernel`` and
  ``_bwd_finish_kernel`` (normalisation backward and the logit_scale gradient's sum): 2. A step
  is 7 launches (9 before the check's reduction and the scale-gradient sum moved into the
  finish kernels), besides autograd's seed gradient; ``test_triton_step_launches`` counts them.
  Distributed adds the feature gathers (two; ids only when given; the size gather only without
  ``rank_sizes``), the column sweep and a few O(B·D) ops to combine the gradients.

Autocast (``torch.autocast``, CPU and CUDA): the features are cast to the autocast dtype at entry,
as autocast casts the inputs of the similarity matmul this op fuses; the op's math (fp32
normalisation, log-sum-exp and accumulation) runs with autocast disabled on every backend, and
the loss is fp32, as autocast's ``cross_entropy`` returns (see :mod:`unigen.kernels.common.autocast`).

Files of this package, in reading order:

- ``reference.py``: the readable reference :func:`contrastive_loss_reference` (dense B×B,
  autograd; what the tests trust), the output type and what every path shares (the
  normalisation's eps, the math dtype);
- ``cpu.py``: the dense PyTorch implementation of the op interface (``backend="torch"``, what
  ``"auto"`` runs on CPU; it also handles the local rows of a distributed batch): norms and input
  check, row statistics and mining, the logit gradient, and the normalisation's backward;
- ``triton_kernels.py``: the ``@triton.jit`` kernels (imported only where triton is installed);
- ``launch.py``: their launchers, tile configs (``_launch_config``) and the split of the sweeps
  (``_splits``);
- ``op.py``: the implementations behind the op, the ``torch.library`` custom ops (forward and
  backward, fake kernels, autograd) and the eager ``autograd.Function``, the gathers of the
  distributed case, the functional form :func:`contrastive_loss` and the module
  :class:`ContrastiveLoss`.

This file only re-exports.
"""

# _NEGATIVE_MODES and _contrastive_on_gathered: the drop-in ClipLoss (kernels/dropin/clip_loss.py)
# runs the op on the batch it gathers itself, as open_clip does
from .op import (
    _NEGATIVE_MODES,  # noqa: F401
    ContrastiveLoss,
    _contrastive_on_gathered,  # noqa: F401
    contrastive_loss,
)
from .reference import ContrastiveLossOutput, contrastive_loss_reference

__all__ = [
    "contrastive_loss",
    "ContrastiveLoss",
    "ContrastiveLossOutput",
    "contrastive_loss_reference",
]
