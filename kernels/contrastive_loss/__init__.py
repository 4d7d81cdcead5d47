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

The file follows the house pattern: the readable reference (``contrastive_loss_reference``), the
Triton kernels and their launchers, a dense PyTorch implementation of the same op interface, the
``torch.library`` custom ops (forward + backward, fake kernels, autograd), then the functional
``contrastive_loss`` and the module ``ContrastiveLoss``.

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
recomputing a [32, D] × [D, 32] tile costs less than either. Nothing of size B×B is ever
stored: extra memory is O(B·D).

Accounting (one process, B = 4096, D = 256, bf16, 32×32 tiles, 4 splits; per step = forward with
``negatives="sample"`` + backward):

- FLOPs: forward 2·2·B²·D = 17.2 G on the tensor cores (both directions), backward 2× that
  (tile recompute + gradient matmul per direction). Per logit the forward adds one exp, and per
  tile row: without ids or smoothing 2 row reductions (max, mass; "hardest" takes the argmax
  with the max), sampling 3 and one scan (max, cumulative weights, the in-tile pick's count);
  ids add 4 (the positives' max, mass, logit sum, count), label smoothing 1 (the logit sum).
  It was one Philox call per 4 logits, 2 logs + 1 exp per logit and 7 reductions per tile row
  whatever the call needed. Random numbers: one Philox call per (row, column tile) and one per
  (row, split) in the merge: 2·B·(B/32 + 4) ≈ 1.1 M calls instead of 2·B²/4 = 8.4 M. Without ids
  the positive logit s_ii is one indexed dot per row: 2·B·D FLOPs per direction, not a masked
  sum over every tile.
- Bytes: the features are read from HBM once per sweep (2·B·D·2 = 4 MiB) and re-read from L2 per
  row block (B/32 · B·D·2 = 256 MiB per direction and sweep, what the 32-row tile costs); the
  forward's partial statistics are (2 + 1) planes without ids or smoothing (2 + 4 + 1 with
  both) × splits × 2·B fp32, plus the int64 candidate per split: 0.4 + 0.25 MiB at B = 4096.
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
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..common.autocast import autocast_dtype, autocast_free, cast_inputs
from ..common.backend import resolve_backend, triton_available, triton_interpreting
from ..common.checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor

_OP = "contrastive_loss"
_NEGATIVE_MODES = {None: 0, "sample": 1, "hardest": 2}
# Feature normalisation as in F.normalize: x / max(||x||, eps).
_NORM_EPS = 1e-12
# The Triton kernels keep a whole feature row in registers (the row block and its gradient
# accumulator); beyond this width "auto" falls back to the PyTorch path.
_TRITON_MAX_DIM = 1024
# (block_m, block_n[, num_warps]) forced on the Triton launchers: interpreter tests use small tiles on tiny
# shapes, the GPU benchmark sweeps other tiles (test_bench_contrastive.py::test_ours_tile_sweep).
# None = the launcher's choice.
_BLOCK_OVERRIDE: Optional[tuple[int, ...]] = None
# Parallelism of the Triton sweeps (see _splits): ~8 programs per SM of an H100, and the fewest
# tiles one split sweeps (the GPU benchmark sweeps the first too). _SPLIT_OVERRIDE (test-only)
# forces a number of splits.
_TARGET_PROGRAMS = 1024
_MIN_TILES_PER_SPLIT = 4
_SPLIT_OVERRIDE: Optional[int] = None


class ContrastiveLossOutput(NamedTuple):
    """``loss``: 0-d tensor. ``neg_text_for_image[i]``: index (into the gathered batch) of the hard
    negative text of local image i, -1 when every text is a positive of image i; likewise
    ``neg_image_for_text``. Both are None with ``negatives=None``."""

    loss: torch.Tensor
    neg_text_for_image: Optional[torch.Tensor]
    neg_image_for_text: Optional[torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Readable reference (single process, dense B×B; what the tests trust)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _mma(a, b, DOT_IEEE: tl.constexpr, ACC: tl.constexpr):
        """a @ b with ACC accumulation. DOT_IEEE is set for fp32/fp64 inputs (full-precision
        products: TF32 would cost ~1e-3 relative error in a cosine, i.e. up to 0.1 in a logit at
        scale 100) and for bf16 under the interpreter, whose bf16 tl.dot is wrong (triton 3.9): the
        launcher then upcasts there only; on a GPU bf16/fp16 tiles go to the tensor cores as is."""
        if DOT_IEEE:
            if a.dtype == tl.bfloat16:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            return tl.dot(a, b, input_precision="ieee", out_dtype=ACC)
        else:
            return tl.dot(a, b, out_dtype=ACC)

    @triton.jit
    def _similarity_tile(q, k_ptr, inv_k_ptr, cols, col_mask, inv_q, scale, stride, dim,
                         BLOCK_D: tl.constexpr, DOT_IEEE: tl.constexpr, ACC: tl.constexpr):
        """Loads one column block of K and returns (s, cos, k, inv_k): the scaled similarity tile
        [BLOCK_M, BLOCK_N], the cosine tile, the raw K block [BLOCK_N, BLOCK_D] and its inverse
        norms.

        Normalisation is fused: the dot product runs on the raw features (tensor cores in the input
        dtype, ACC accumulation) and is multiplied by both inverse norms afterwards, which never
        rounds a normalised copy back to bf16.
        """
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(k_ptr + cols[:, None] * stride + offs_d[None, :],
                    mask=col_mask[:, None] & (offs_d[None, :] < dim), other=0.0)
        inv_k = tl.load(inv_k_ptr + cols, mask=col_mask, other=0.0)
        dots = _mma(q, tl.trans(k), DOT_IEEE, ACC)
        cos = dots * inv_q[:, None] * inv_k[None, :]
        return cos * scale, cos, k, inv_k

    @triton.jit
    def _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d):
        """Direction d = 0: image rows against text columns; d = 1: text rows against image
        columns. Both directions run in the same launch (program_id(1)), which doubles the grid
        for small batches and halves the launches."""
        if d == 0:
            q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr
        else:
            q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = txt_ptr, img_ptr, inv_txt_ptr, inv_img_ptr
        return q_ptr, k_ptr, inv_q_ptr, inv_k_ptr

    @triton.jit
    def _pair_ids(ids_ptr, idx, mask, HAS_IDS: tl.constexpr):
        """The ids of rows/columns ``idx`` of the gathered batch: loaded when the caller gave
        ``ids``, else the index itself (pair i is the only positive of i), with no ids buffer."""
        if HAS_IDS:
            ids = tl.load(ids_ptr + idx, mask=mask, other=0)
        else:
            ids = idx.to(tl.int64)
        return ids

    @triton.jit
    def _uniforms(seed, c0, c1, c2, c3):
        """Two uniforms in the open interval (0, 1) per element of the uint32 counters: words 0
        and 1 of Philox(seed, (c0, c1, c2, c3)), 24 bits each, centred ((k + ½) / 2^24), so a
        draw is never exactly 0 or 1 (see the reservoir step in ``_fwd_kernel``). A counter-based
        source: the draws depend on the counters only, not on the launch order."""
        w0, w1, _, _ = tl.philox(seed, c0, c1, c2, c3)
        u0 = ((w0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        u1 = ((w1 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        return u0, u1

    @triton.jit
    def _inverse_norm(sq, eps, ACC: tl.constexpr):
        """1 / max(sqrt(sq), eps), rounded as torch rounds it (IEEE square root and division)."""
        if ACC == tl.float64:
            inv = 1.0 / tl.maximum(tl.sqrt(sq), eps)  # fp64 sqrt and division are IEEE
        else:
            inv = tl.div_rn(tl.full(sq.shape, 1.0, tl.float32), tl.maximum(tl.sqrt_rn(sq), eps))
        return inv

    @triton.jit
    def _prep_kernel(img_ptr, txt_ptr, scale_ptr, inv_ptr, ok_ptr, n, dim, stride, eps,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
        """Inverse norms of both feature sets, ``inv[d, i] = 1 / max(||x_i||, eps)`` (as
        F.normalize), and the input check in the same pass: ``ok[d · programs + pid]`` is 1 when
        the rows of this block are finite, and the last entry when logit_scale is positive and
        finite. A squared norm is finite exactly when its row is (nan and ±inf propagate; a
        finite row whose squared norm overflows the accumulator fails too, rightly: its
        normalised copy would be garbage), so the check costs no extra pass over the features.
        Grid: (row blocks, 2 feature sets)."""
        pid = tl.program_id(0)
        d = tl.program_id(1)
        x_ptr = img_ptr
        if d == 1:
            x_ptr = txt_ptr
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + rows[:, None] * stride + offs_d[None, :],
                    mask=row_mask[:, None] & (offs_d[None, :] < dim), other=0.0).to(ACC)
        sq = tl.sum(x * x, 1)
        tl.store(inv_ptr + d * n + rows, _inverse_norm(sq, eps, ACC), mask=row_mask)
        finite = (sq < float("inf")) | (~row_mask)  # nan < inf is False
        tl.store(ok_ptr + d * tl.num_programs(0) + pid, tl.min(finite.to(tl.int32), 0))
        if pid == 0 and d == 0:
            s = tl.load(scale_ptr).to(ACC)
            tl.store(ok_ptr + 2 * tl.num_programs(0), ((s > 0) & (s < float("inf"))).to(tl.int32))

    @triton.jit
    def _fwd_kernel(
        img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, ids_ptr, scale_ptr, seed_ptr,
        part_ptr, part_idx_ptr,
        n_q, n_k, dim, row_start, stride, cols_per_split,
        MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_IEEE: tl.constexpr, ACC: tl.constexpr, HAS_IDS: tl.constexpr, SMOOTH: tl.constexpr,
    ):
        """One program = BLOCK_M local query rows of one direction swept against one split of the
        columns (grid: row blocks, direction, column splits).

        Per row it keeps the online log-sum-exp of the *candidates* (the non-positive columns:
        running max m_c, running mass l_c = Σ exp(s - m_c)), which is at once the denominator's
        bulk and the mass the sampler needs, and, only where the call needs them:

        - HAS_IDS: the positives' own log-sum-exp (m_p, l_p), their logit sum and count (one
          exp per logit serves both sets: the shift is picked per element). Without ids the
          row's only positive is its pair: its logit s_ii comes from one O(D) indexed dot per
          row (split 0 only) and the finish kernel adds it to the log-sum-exp.
        - SMOOTH (label smoothing): the sum of all logits.
        - MODE 1 (sample): exact weighted reservoir sampling per (row, tile). With the tile's
          candidate weights w_j = exp(s_j - m_c) and mass m_t = Σ w_j, the candidate switches to
          this tile with probability m_t / (l_c + m_t) (uniform u₀), and inside it column j is
          taken by inverse CDF, the first j with cumsum(w)_j ≥ u₁·m_t (uniform u₁; both in (0, 1)
          so a zero-weight column is never taken). By induction P(column j) = w_j / Σ_all w: the
          law of softmax(s) over the candidates, drawn with two uniforms per (row, tile) — one
          Philox call per row and tile, counter (column tile, global row, 0, direction) — and no
          per-logit random number or log. MODE 2 (hardest): the running argmax comes with the
          tile max (one reduction). A row without any candidate keeps index -1.

        Partial statistics go to ``part`` [planes, splits, 2, n_q] (see ``_part_planes``) and the
        candidate index to ``part_idx`` [splits, 2, n_q]; ``_fwd_finish_kernel`` merges the
        splits (by the same reservoir rule).
        """
        pid = tl.program_id(0)
        d = tl.program_id(1)
        split = tl.program_id(2)
        col_begin = split * cols_per_split
        col_end = tl.minimum(col_begin + cols_per_split, n_k)
        q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_q
        grows = row_start + rows  # rows of the gathered batch
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + grows[:, None] * stride + offs_d[None, :],
                    mask=row_mask[:, None] & (offs_d[None, :] < dim), other=0.0)
        inv_q = tl.load(inv_q_ptr + grows, mask=row_mask, other=0.0)
        ids_q = _pair_ids(ids_ptr, grows, row_mask, HAS_IDS)
        scale = tl.load(scale_ptr).to(ACC)
        if MODE == 1:
            seed = tl.load(seed_ptr)
            rng_row = grows.to(tl.uint32)
            rng_dir = (0 * rows + d).to(tl.uint32)
            rng_zero = 0 * rng_row

        m_c = tl.full((BLOCK_M,), float("-inf"), ACC)
        l_c = tl.zeros((BLOCK_M,), ACC)
        if HAS_IDS:
            m_p = tl.full((BLOCK_M,), float("-inf"), ACC)
            l_p = tl.zeros((BLOCK_M,), ACC)
            pos_sum = tl.zeros((BLOCK_M,), ACC)
            pos_cnt = tl.zeros((BLOCK_M,), ACC)
        if SMOOTH:
            row_sum = tl.zeros((BLOCK_M,), ACC)
        best_idx = tl.full((BLOCK_M,), -1, tl.int64)

        if not HAS_IDS:
            if split == 0:
                # s_ii by an indexed dot: O(D) per row instead of a masked reduction per tile.
                # Chunks of 32 features reloaded (from L2) rather than the register-resident q:
                # a whole [BLOCK_M, D] fp32 product cost ~40 registers/thread at D = 256.
                dot = tl.zeros((BLOCK_M,), ACC)
                for c in range(0, dim, 32):
                    offs_c = c + tl.arange(0, 32)
                    m_c2 = row_mask[:, None] & (offs_c[None, :] < dim)
                    q_c = tl.load(q_ptr + grows[:, None] * stride + offs_c[None, :], mask=m_c2, other=0.0)
                    k_c = tl.load(k_ptr + grows[:, None] * stride + offs_c[None, :], mask=m_c2, other=0.0)
                    dot += tl.sum(q_c.to(ACC) * k_c.to(ACC), 1)
                inv_k_ii = tl.load(inv_k_ptr + grows, mask=row_mask, other=0.0)
                tl.store(part_ptr + 2 * tl.num_programs(2) * 2 * n_q + (2 * split + d) * n_q + rows,
                         dot * inv_q * inv_k_ii * scale, mask=row_mask)

        for start in range(col_begin, col_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < col_end
            s, cos, k, inv_k = _similarity_tile(q, k_ptr, inv_k_ptr, cols, col_mask, inv_q, scale,
                                                stride, dim, BLOCK_D, DOT_IEEE, ACC)
            if HAS_IDS:
                ids_k = _pair_ids(ids_ptr, cols, col_mask, HAS_IDS)
                pos = (ids_q[:, None] == ids_k[None, :]) & col_mask[None, :]
            else:
                pos = grows[:, None] == cols[None, :]  # the pair itself
            cand = col_mask[None, :] & (~pos)
            s_c = tl.where(cand, s, float("-inf"))
            if MODE == 2:
                tile_max, tile_arg = tl.max(s_c, 1, return_indices=True,
                                            return_indices_tie_break_left=True)
                # strict '>': ties keep the earlier column, a tile without candidates never wins
                best_idx = tl.where(tile_max > m_c, tile_arg.to(tl.int64) + start, best_idx)
            else:
                tile_max = tl.max(s_c, 1)
            m_new = tl.maximum(m_c, tile_max)
            # a row may have seen no candidate yet (-inf): shift by 0 then (exp(-inf) = 0, no nan)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_c - shift)
            if HAS_IDS:
                mp_new = tl.maximum(m_p, tl.max(tl.where(pos, s, float("-inf")), 1))
                p_shift = tl.where(mp_new == float("-inf"), 0.0, mp_new)
                e = tl.exp(s - tl.where(pos, p_shift[:, None], shift[:, None]))
                l_p = l_p * tl.exp(m_p - p_shift) + tl.sum(tl.where(pos, e, 0.0), 1)
                m_p = mp_new
                pos_sum += tl.sum(tl.where(pos, s, 0.0), 1)
                pos_cnt += tl.sum(pos.to(ACC), 1)
            else:
                e = tl.exp(s - shift[:, None])
            w = tl.where(cand, e, 0.0)
            if MODE == 1:
                cum = tl.cumsum(w, 1)
                mass = tl.max(cum, 1)  # = the last entry (w ≥ 0): the same number the pick uses
                u_switch, u_pick = _uniforms(seed, rng_zero + start // BLOCK_N, rng_row, rng_zero,
                                             rng_dir)
                total = l_c * alpha + mass
                switch = u_switch.to(ACC) * total < mass
                pick = tl.sum((cum < (u_pick.to(ACC) * mass)[:, None]).to(tl.int32), 1)
                best_idx = tl.where(switch, pick.to(tl.int64) + start, best_idx)
                l_c = total
            else:
                l_c = l_c * alpha + tl.sum(w, 1)
            m_c = m_new
            if SMOOTH:
                row_sum += tl.sum(tl.where(col_mask[None, :], s, 0.0), 1)

        out = (split * 2 + d) * n_q + rows
        plane = tl.num_programs(2) * 2 * n_q
        tl.store(part_ptr + out, m_c, mask=row_mask)
        tl.store(part_ptr + plane + out, l_c, mask=row_mask)
        if HAS_IDS:
            tl.store(part_ptr + 2 * plane + out, m_p, mask=row_mask)
            tl.store(part_ptr + 3 * plane + out, l_p, mask=row_mask)
            tl.store(part_ptr + 4 * plane + out, pos_sum, mask=row_mask)
            tl.store(part_ptr + 5 * plane + out, pos_cnt, mask=row_mask)
        if SMOOTH:
            tl.store(part_ptr + (6 if HAS_IDS else 3) * plane + out, row_sum, mask=row_mask)
        if MODE != 0:
            tl.store(part_idx_ptr + out, best_idx, mask=row_mask)


    @triton.jit
    def _grad_logits(s, lse, pos, pos_cnt, valid, weight, keep, smooth):
        """dL/ds for one tile of one direction's loss: weight · (softmax(s) - target), target =
        keep·[pos]/|P| + smooth (keep = 1-ε, smooth = ε/N). ``lse`` and ``pos_cnt`` are that
        direction's row statistics, broadcast along the tile ([M, 1] when its rows are the tile's
        rows, [1, N] when they are its columns); entries outside ``valid`` give 0."""
        p = tl.exp(s - lse)
        target = tl.where(pos, keep / pos_cnt, 0.0) + smooth
        return tl.where(valid, weight * (p - target), 0.0)

    @triton.jit
    def _rows_bwd_kernel(
        img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, ids_ptr, scale_ptr, grad_ptr,
        lse_ptr, pos_cnt_ptr, dq_ptr, dscale_ptr,
        n_q, n_k, dim, row_start, stride, keep, smooth, weight_scale, cols_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_IEEE: tl.constexpr, ACC: tl.constexpr, HAS_IDS: tl.constexpr, SYMMETRIC: tl.constexpr,
    ):
        """Gradient w.r.t. the normalised local query rows of direction d, dq̂_i = scale Σ_j G_ij k̂_j,
        and the per-row part of dL/dscale = Σ_j G_ij cos_ij, over one split of the columns. One
        program owns BLOCK_M rows of one split, so its [BLOCK_M, D] accumulator needs no atomics:
        it writes dq [splits, 2, n_q, D] and ``_bwd_finish_kernel`` sums the splits. The tile is recomputed
        from the saved lse.

        SYMMETRIC (one process: every row is local, n_q = n_k): the tile's columns are the other
        direction's rows, and s_ij is the same logit in both losses, so G gets the other loss's
        term too, from the other direction's saved statistics at the columns. This sweep then
        yields the whole gradient of each feature set and the column kernel is not run: the
        backward costs two tile matmuls per (i, j) and direction instead of four.
        """
        pid = tl.program_id(0)
        d = tl.program_id(1)
        split = tl.program_id(2)
        col_begin = split * cols_per_split
        col_end = tl.minimum(col_begin + cols_per_split, n_k)
        q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n_q
        grows = row_start + rows
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_ptr + grows[:, None] * stride + offs_d[None, :],
                    mask=row_mask[:, None] & (offs_d[None, :] < dim), other=0.0)
        inv_q = tl.load(inv_q_ptr + grows, mask=row_mask, other=0.0)
        ids_q = _pair_ids(ids_ptr, grows, row_mask, HAS_IDS)
        lse = tl.load(lse_ptr + d * n_q + rows, mask=row_mask, other=0.0)
        pos_cnt = tl.load(pos_cnt_ptr + d * n_q + rows, mask=row_mask, other=1.0)
        scale = tl.load(scale_ptr).to(ACC)
        weight = tl.load(grad_ptr).to(ACC) * weight_scale
        acc = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        dscale = tl.zeros((BLOCK_M,), ACC)
        for start in range(col_begin, col_end, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_mask = cols < col_end
            s, cos, k, inv_k = _similarity_tile(q, k_ptr, inv_k_ptr, cols, col_mask, inv_q, scale,
                                                stride, dim, BLOCK_D, DOT_IEEE, ACC)
            ids_k = _pair_ids(ids_ptr, cols, col_mask, HAS_IDS)
            pos = ids_q[:, None] == ids_k[None, :]
            valid = row_mask[:, None] & col_mask[None, :]
            g = _grad_logits(s, lse[:, None], pos, pos_cnt[:, None], valid, weight, keep, smooth)
            dscale += tl.sum(g * cos, 1)  # this direction's loss only: each is counted once
            if SYMMETRIC:
                other = (1 - d) * n_q + cols
                lse_k = tl.load(lse_ptr + other, mask=col_mask, other=0.0)
                cnt_k = tl.load(pos_cnt_ptr + other, mask=col_mask, other=1.0)
                g += _grad_logits(s, lse_k[None, :], pos, cnt_k[None, :], valid, weight, keep, smooth)
            # k̂ = k · inv_k: fold the column norm into G before the matmul (G is cast to the input
            # dtype for the tensor cores, as flash-attention does with P).
            gk = (g * inv_k[None, :]).to(k.dtype)
            acc += _mma(gk, k, DOT_IEEE, ACC)
        out = (split * 2 + d) * n_q + rows
        tl.store(dq_ptr + out[:, None] * dim + offs_d[None, :], acc * scale,
                 mask=row_mask[:, None] & (offs_d[None, :] < dim))
        tl.store(dscale_ptr + out, dscale, mask=row_mask)

    @triton.jit
    def _cols_bwd_kernel(
        img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, ids_ptr, scale_ptr, grad_ptr,
        lse_ptr, pos_cnt_ptr, dk_ptr,
        n_q, n_k, dim, row_start, stride, keep, smooth, weight_scale, rows_per_split,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DOT_IEEE: tl.constexpr, ACC: tl.constexpr, HAS_IDS: tl.constexpr,
    ):
        """Gradient w.r.t. the normalised key columns of direction d, dk̂_j = scale Σ_i G_ij q̂_i.
        One program owns BLOCK_N columns and sweeps every local query row block (deterministic, no
        atomics). It works on the transposed tile G^T [BLOCK_N, BLOCK_M] computed as K·Q^T, with Q
        loaded in both layouts, so no register tile is ever transposed (with fp32 inputs,
        transposing G made the sm_90 build spill its whole state to local memory). With several
        splits of the query rows, each writes its part of dk [splits, 2, n_k, D]; the launcher
        sums them."""
        pid = tl.program_id(0)
        d = tl.program_id(1)
        split = tl.program_id(2)
        row_begin = split * rows_per_split
        row_end = tl.minimum(row_begin + rows_per_split, n_q)
        q_ptr, k_ptr, inv_q_ptr, inv_k_ptr = _direction(img_ptr, txt_ptr, inv_img_ptr, inv_txt_ptr, d)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < n_k
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < dim
        k = tl.load(k_ptr + cols[:, None] * stride + offs_d[None, :],
                    mask=col_mask[:, None] & d_mask[None, :], other=0.0)
        inv_k = tl.load(inv_k_ptr + cols, mask=col_mask, other=0.0)
        ids_k = _pair_ids(ids_ptr, cols, col_mask, HAS_IDS)
        scale = tl.load(scale_ptr).to(ACC)
        weight = tl.load(grad_ptr).to(ACC) * weight_scale
        acc = tl.zeros((BLOCK_N, BLOCK_D), ACC)
        for start in range(row_begin, row_end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            grows = row_start + rows
            q_t = tl.load(q_ptr + grows[None, :] * stride + offs_d[:, None],
                          mask=row_mask[None, :] & d_mask[:, None], other=0.0)
            inv_q = tl.load(inv_q_ptr + grows, mask=row_mask, other=0.0)
            ids_q = _pair_ids(ids_ptr, grows, row_mask, HAS_IDS)
            lse = tl.load(lse_ptr + d * n_q + rows, mask=row_mask, other=0.0)
            pos_cnt = tl.load(pos_cnt_ptr + d * n_q + rows, mask=row_mask, other=1.0)
            s_t = _mma(k, q_t, DOT_IEEE, ACC) * inv_k[:, None] * inv_q[None, :] * scale
            g_t = _grad_logits(s_t, lse[None, :], ids_k[:, None] == ids_q[None, :], pos_cnt[None, :],
                               col_mask[:, None] & row_mask[None, :], weight, keep, smooth)
            acc += _mma((g_t * inv_q[None, :]).to(q_t.dtype), tl.trans(q_t), DOT_IEEE, ACC)
        out = (split * 2 + d) * n_k + cols
        tl.store(dk_ptr + out[:, None] * dim + offs_d[None, :], acc * scale,
                 mask=col_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _fwd_finish_kernel(
        part_ptr, part_idx_ptr, seed_ptr, ok_ptr, n_ok, loss_ptr, lse_ptr, pos_cnt_ptr, neg_ptr,
        flag_ptr, n_q, row_start, splits, keep, smooth, loss_scale,
        MODE: tl.constexpr, HAS_IDS: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr,
        ACC: tl.constexpr,
    ):
        """Merges the column splits of ``_fwd_kernel``, reduces the loss and the input check, in
        one program.

        Per row of both directions (2·n_q, flattened direction-major), walking the splits in
        order: the candidates' (max, mass) merge as log-sum-exp partials do, and the negative by
        the reservoir rule with the merged masses (MODE 1: split s's candidate replaces the
        running one with probability mass_s / (mass so far + mass_s), one uniform per (row,
        split), Philox counter (split, global row, 1, direction)); MODE 2 keeps the first split
        with the largest candidate logit. Then lse = logaddexp(candidates, positives) (the
        positive is s_ii without ids), the row loss -Σ_j target_ij log softmax(s)_ij with
        target = keep·[pos]/|P| + smooth, and loss = loss_scale · Σ rows. One program walks every
        row in a fixed order, so the loss is deterministic. ``flag`` = 1 when every check flag of
        ``_prep_kernel`` is (the device assertion then reads one int: one launch, not two)."""
        n_rows = 2 * n_q
        plane = splits * n_rows
        total = tl.zeros((BLOCK,), ACC)
        if MODE == 1:
            seed = tl.load(seed_ptr)
        for start in range(0, n_rows, BLOCK):
            r = start + tl.arange(0, BLOCK)
            mask = r < n_rows
            m = tl.full((BLOCK,), float("-inf"), ACC)
            mass = tl.zeros((BLOCK,), ACC)
            best_idx = tl.full((BLOCK,), -1, tl.int64)
            if HAS_IDS:
                m_p = tl.full((BLOCK,), float("-inf"), ACC)
                l_p = tl.zeros((BLOCK,), ACC)
                pos_sum = tl.zeros((BLOCK,), ACC)
                pos_cnt = tl.zeros((BLOCK,), ACC)
            if SMOOTH:
                row_sum = tl.zeros((BLOCK,), ACC)
            if MODE == 1:
                rng_dir = (r >= n_q).to(tl.uint32)
                rng_row = (row_start + r - n_q * (r >= n_q).to(tl.int32)).to(tl.uint32)
            for s in range(0, splits):
                off = s * n_rows + r
                m_s = tl.load(part_ptr + off, mask=mask, other=float("-inf"))
                l_s = tl.load(part_ptr + plane + off, mask=mask, other=0.0)
                if MODE == 2:
                    # strict: the first split wins ties; a split without candidates (-inf) never
                    better = m_s > m
                m_new = tl.maximum(m, m_s)
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                mass_s = l_s * tl.exp(m_s - shift)
                mass = mass * tl.exp(m - shift) + mass_s
                m = m_new
                if MODE == 1:
                    u, _ = _uniforms(seed, (0 * r + s).to(tl.uint32), rng_row,
                                     (0 * r + 1).to(tl.uint32), rng_dir)
                    better = u.to(ACC) * mass < mass_s
                if MODE != 0:
                    idx = tl.load(part_idx_ptr + off, mask=mask, other=-1)
                    best_idx = tl.where(better, idx, best_idx)
                if HAS_IDS:
                    mp_s = tl.load(part_ptr + 2 * plane + off, mask=mask, other=float("-inf"))
                    lp_s = tl.load(part_ptr + 3 * plane + off, mask=mask, other=0.0)
                    mp_new = tl.maximum(m_p, mp_s)
                    p_shift = tl.where(mp_new == float("-inf"), 0.0, mp_new)
                    l_p = l_p * tl.exp(m_p - p_shift) + lp_s * tl.exp(mp_s - p_shift)
                    m_p = mp_new
                    pos_sum += tl.load(part_ptr + 4 * plane + off, mask=mask, other=0.0)
                    pos_cnt += tl.load(part_ptr + 5 * plane + off, mask=mask, other=0.0)
                if SMOOTH:
                    row_sum += tl.load(part_ptr + (6 if HAS_IDS else 3) * plane + off, mask=mask,
                                       other=0.0)
            has_c = mass > 0
            lse_c = tl.where(has_c, m + tl.log(tl.where(has_c, mass, 1.0)), float("-inf"))
            if HAS_IDS:
                # every valid row has a positive (its pair): lse_p is finite
                lse_p = tl.where(mask, m_p + tl.log(tl.where(mask, l_p, 1.0)), 0.0)
            else:
                pos_sum = tl.load(part_ptr + 2 * plane + r, mask=mask, other=0.0)  # s_ii, split 0
                pos_cnt = tl.full((BLOCK,), 1.0, ACC)
                lse_p = pos_sum
            hi = tl.maximum(lse_c, lse_p)
            lse = hi + tl.log(tl.exp(lse_c - hi) + tl.exp(lse_p - hi))
            # valid rows have |P| >= 1 (the pair itself); the clamp only guards the arithmetic
            row_loss = lse - keep * pos_sum / tl.maximum(pos_cnt, 1.0)
            if SMOOTH:
                row_loss -= smooth * row_sum
            total += tl.where(mask, row_loss, 0.0)
            tl.store(lse_ptr + r, lse, mask=mask)
            tl.store(pos_cnt_ptr + r, pos_cnt, mask=mask)
            if MODE != 0:
                tl.store(neg_ptr + r, best_idx, mask=mask)
        tl.store(loss_ptr, tl.sum(total, 0) * loss_scale)
        ok = tl.full((BLOCK,), 1, tl.int32)
        for start in range(0, n_ok, BLOCK):
            o = start + tl.arange(0, BLOCK)
            ok = tl.minimum(ok, tl.load(ok_ptr + o, mask=o < n_ok, other=1))
        tl.store(flag_ptr, tl.min(ok, 0))


    @triton.jit
    def _bwd_finish_kernel(
        img_ptr, txt_ptr, inv_ptr, dq_ptr, d_img_ptr, d_txt_ptr, dscale_part_ptr, dscale_ptr,
        n, dim, stride, splits, n_dscale,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One process: sums the column splits of ``_rows_bwd_kernel`` (the gradient w.r.t. the
        normalised features, dq [splits, 2, n, D]) and takes it through the normalisation,
        dx = (dx̂ - x̂ (x̂·dx̂)) / ||x||, straight into the input dtype. Grid: (row blocks, 2).
        Program (0, 0) also sums the ``n_dscale`` per-row parts of dL/dscale in a fixed order
        (deterministic, and one launch fewer than a separate sum)."""
        pid = tl.program_id(0)
        d = tl.program_id(1)
        if pid == 0 and d == 0:
            part = tl.zeros((BLOCK_S,), ACC)
            for start in range(0, n_dscale, BLOCK_S):
                o = start + tl.arange(0, BLOCK_S)
                part += tl.load(dscale_part_ptr + o, mask=o < n_dscale, other=0.0)
            tl.store(dscale_ptr, tl.sum(part, 0))
        x_ptr = img_ptr
        out_ptr = d_img_ptr
        if d == 1:
            x_ptr = txt_ptr
            out_ptr = d_txt_ptr
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < n
        offs_d = tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (offs_d[None, :] < dim)
        grad = tl.zeros((BLOCK_M, BLOCK_D), ACC)
        for s in range(0, splits):
            grad += tl.load(dq_ptr + ((s * 2 + d) * n + rows)[:, None] * dim + offs_d[None, :],
                            mask=mask, other=0.0)
        inv = tl.load(inv_ptr + d * n + rows, mask=row_mask, other=0.0)
        x_hat = tl.load(x_ptr + rows[:, None] * stride + offs_d[None, :], mask=mask,
                        other=0.0).to(ACC) * inv[:, None]
        dx = (grad - x_hat * tl.sum(x_hat * grad, 1)[:, None]) * inv[:, None]
        tl.store(out_ptr + rows[:, None] * dim + offs_d[None, :],
                 dx.to(out_ptr.dtype.element_ty), mask=mask)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch_config(dim: int, dtype: torch.dtype):
    """Tile sizes for the Triton kernels.

    BLOCK_D covers the whole (padded) feature dimension: a query block is loaded once and the
    gradient accumulator of a block stays on chip. Register pressure, not the grid, sets the tile.
    Compiled for sm_90 (``tests/kernels/gpu_compile_check.py contrastive bf16 256``): bf16/fp16
    at D = 256 with 32×32 tiles and 4 warps needs 168-219 registers/thread (the forward sweep
    167-195 over its MODE × ids × smoothing variants) and no spills, while
    64×64 spills in the backward at 4, 8 and 16 warps (the GPU benchmark sweeps 64×32, 32×64 and
    64×64 at 8 warps against this default). 32-row tiles give 2·B/32 row blocks (both
    directions), 256 at B = 4096, which ``_splits`` multiplies to ~1024 programs. D = 512 and
    1024 need 16×16 tiles (8 warps at 1024). fp32 and
    fp64 take the full-precision FMA path, whose operands are twice as wide: 16×16 keeps it
    spill-free.
    """
    block_d = max(16, triton.next_power_of_2(dim))
    half = dtype in (torch.float16, torch.bfloat16)
    block_m = block_n = 32 if (half and block_d <= 256) else 16
    num_warps = 8 if block_d >= 1024 else 4
    if _BLOCK_OVERRIDE is not None:
        block_m, block_n, *warps = _BLOCK_OVERRIDE
        num_warps = warps[0] if warps else num_warps
    return block_m, block_n, block_d, num_warps


def _dot_ieee(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float64) or (dtype == torch.bfloat16 and triton_interpreting())


def _splits(n_outer: int, block_outer: int, n_inner: int, block_inner: int):
    """Splits of the inner (swept) dimension and their width, so that the grid of
    (outer blocks × 2 directions × splits) reaches ~``_TARGET_PROGRAMS`` programs.

    One program per row block leaves a GPU mostly idle at the batch sizes of training: at
    B = 4096 with 32-row tiles that is 256 programs on 132 SMs, each sweeping 128 column tiles
    one after the other. Splitting the sweep (as flash-decoding splits the keys) multiplies the
    programs; each split keeps at least ``_MIN_TILES_PER_SPLIT`` tiles, and large batches that
    fill the GPU already keep one split (so no partial buffers: memory stays O(B·D)).
    """
    tiles = triton.cdiv(n_inner, block_inner)
    if _SPLIT_OVERRIDE is not None:
        splits = _SPLIT_OVERRIDE
    else:
        wanted = triton.cdiv(_TARGET_PROGRAMS, 2 * triton.cdiv(n_outer, block_outer))
        splits = min(wanted, tiles // _MIN_TILES_PER_SPLIT)
    splits = max(1, min(splits, tiles))
    width = triton.cdiv(tiles, splits) * block_inner
    return triton.cdiv(n_inner, width), width


def _acc_tl(acc: torch.dtype):
    return tl.float64 if acc == torch.float64 else tl.float32


def _row_block(block_d: int) -> int:
    """Rows per program of the O(B·D) passes (norms, gradient epilogue): ~2048 elements."""
    return max(1, 2048 // block_d)


def _triton_prep(image, text, logit_scale):
    """Inverse norms ``inv`` [2, N] (image rows, then text rows) and the check flags of
    ``_prep_kernel`` ([image blocks, text blocks, logit_scale]), in one launch."""
    n, dim = image.shape
    acc = _acc_dtype(image.dtype)
    _, _, block_d, num_warps = _launch_config(dim, image.dtype)
    block_m = _row_block(block_d)
    blocks = triton.cdiv(n, block_m)
    inv = torch.empty(2, n, dtype=acc, device=image.device)
    ok = torch.empty(2 * blocks + 1, dtype=torch.int32, device=image.device)
    _prep_kernel[(blocks, 2)](image, text, logit_scale, inv, ok, n, dim, dim, _NORM_EPS,
                              BLOCK_M=block_m, BLOCK_D=block_d, ACC=_acc_tl(acc), num_warps=num_warps)
    return inv, ok, blocks


# Rows per step of the one-program forward finish: fp64 state is twice as wide, and 1024 rows
# spilled with ids (sm_90: 255 registers + 524 B of spill stores; 256 rows: none).
_FINISH_BLOCK = {torch.float32: 1024, torch.float64: 256}


def _part_planes(has_ids: bool, smooth: bool) -> int:
    """Planes of ``_fwd_kernel``'s partial buffer: candidate max and mass; with ids the
    positives' max, mass, logit sum and count, else s_ii (split 0 only); the logit sum with
    label smoothing. Only what the call needs is reduced and stored."""
    return 2 + (4 if has_ids else 1) + (1 if smooth else 0)


def _triton_fwd(image, text, inv, ids, scale, seeds, row_start, n_local, keep, smooth, mode, ok):
    """Both directions: the sweep, then the merge of its splits and of the prep pass's check
    flags (two launches). Returns the loss, negatives [2, n_local], lse [2, n_local], pos_cnt
    [2, n_local] and the check flag [1] (int32, 1 = inputs ok)."""
    n, dim = image.shape
    acc = _acc_dtype(image.dtype)
    dev = image.device
    block_m, block_n, block_d, num_warps = _launch_config(dim, image.dtype)
    splits, width = _splits(n_local, block_m, n, block_n)
    has_ids, smoothing = ids is not None, smooth != 0.0
    part = torch.empty(_part_planes(has_ids, smoothing), splits, 2, n_local, dtype=acc, device=dev)
    part_idx = torch.empty(splits if mode else 1, 2, n_local, dtype=torch.int64, device=dev)
    inv_i, inv_t = inv.unbind(0)
    seed_arg = seeds if seeds is not None else part_idx  # unread unless MODE 1
    _fwd_kernel[(triton.cdiv(n_local, block_m), 2, splits)](
        image, text, inv_i, inv_t, ids if has_ids else part_idx, scale, seed_arg, part, part_idx,
        n_local, n, dim, row_start, dim, width,
        MODE=mode, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        DOT_IEEE=_dot_ieee(image.dtype), ACC=_acc_tl(acc), HAS_IDS=has_ids, SMOOTH=smoothing,
        num_warps=num_warps,
    )
    loss = torch.empty((), dtype=acc, device=dev)
    # separate buffers: views of one would alias each other (custom ops may not return that)
    lse = torch.empty(2, n_local, dtype=acc, device=dev)
    pos_cnt = torch.empty(2, n_local, dtype=acc, device=dev)
    neg = torch.empty(2, n_local, dtype=torch.int64, device=dev)
    flag = torch.empty(1, dtype=torch.int32, device=dev)
    # ½ (mean over image rows + mean over text rows)
    _fwd_finish_kernel[(1,)](part, part_idx, seed_arg, ok, ok.numel(), loss, lse, pos_cnt, neg,
                             flag, n_local, row_start, splits, keep, smooth, 0.5 / n_local,
                             MODE=mode, HAS_IDS=has_ids, SMOOTH=smoothing,
                             BLOCK=_FINISH_BLOCK[acc], ACC=_acc_tl(acc))
    return loss, neg, lse, pos_cnt, flag


def _triton_bwd(grad_loss, image, text, inv, ids, scale, lse, pos_cnt, row_start, keep, smooth,
                normalize=True):
    """Gradients of (image, text) in their dtype and of logit_scale (fp32/fp64).

    One process (every row local): one row sweep per direction yields both whole gradients, and
    ``_bwd_finish_kernel`` sums its splits, applies the normalisation's backward and (program
    (0, 0)) sums the logit_scale gradient: two launches. Distributed: the column sweep adds the
    gradient of the gathered columns,
    and the pieces are combined here."""
    n, dim = image.shape
    n_local = lse.shape[1]
    acc = _acc_dtype(image.dtype)
    dev = image.device
    block_m, block_n, block_d, num_warps = _launch_config(dim, image.dtype)
    symmetric = n_local == n and row_start == 0
    row_splits, row_width = _splits(n_local, block_m, n, block_n)  # rows kernel: column splits
    dq = torch.empty(row_splits, 2, n_local, dim, dtype=acc, device=dev)
    dscale = torch.empty(row_splits, 2, n_local, dtype=acc, device=dev)
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_IEEE=_dot_ieee(image.dtype),
                ACC=_acc_tl(acc), HAS_IDS=ids is not None, num_warps=num_warps)
    inv_i, inv_t = inv.unbind(0)
    # Every row loss enters with weight grad_loss · ½ · 1/n_local (two directions, mean over rows).
    common = (image, text, inv_i, inv_t, ids if ids is not None else lse, scale, grad_loss, lse,
              pos_cnt)
    sizes = (n_local, n, dim, row_start, dim, keep, smooth, 0.5 / n_local)
    _rows_bwd_kernel[(triton.cdiv(n_local, block_m), 2, row_splits)](
        *common, dq, dscale, *sizes, row_width, SYMMETRIC=symmetric, **meta)
    if symmetric and normalize:
        d_image, d_text = torch.empty_like(image), torch.empty_like(text)
        d_scale = torch.empty((), dtype=acc, device=dev)
        rows = _row_block(block_d)
        _bwd_finish_kernel[(triton.cdiv(n, rows), 2)](
            image, text, inv, dq, d_image, d_text, dscale, d_scale, n, dim, dim, row_splits,
            dscale.numel(), BLOCK_M=rows, BLOCK_D=block_d, ACC=_acc_tl(acc), BLOCK_S=1024,
            num_warps=num_warps)
        return d_image, d_text, d_scale
    d_scale = dscale.sum()
    if symmetric:
        # raw dot products (inv = 1): the row sweeps' sums are the feature gradients themselves
        d_feats = dq[0] if row_splits == 1 else dq.sum(0)
        # copies: two views of one buffer would alias each other (custom ops may not return that)
        return d_feats[0].to(image.dtype, copy=True), d_feats[1].to(text.dtype, copy=True), d_scale
    col_splits, col_width = _splits(n, block_n, n_local, block_m)  # cols kernel: row splits
    dk = torch.empty(col_splits, 2, n, dim, dtype=acc, device=dev)
    _cols_bwd_kernel[(triton.cdiv(n, block_n), 2, col_splits)](*common, dk, *sizes, col_width, **meta)
    dk = dk[0] if col_splits == 1 else dk.sum(0)
    dq = dq[0] if row_splits == 1 else dq.sum(0)
    return (*_combine_distributed(image, text, inv, dq, dk, row_start, normalize), d_scale)


# ----------------------------------------------------------------------------------------------
# Dense PyTorch implementation of the op interface (backend="torch"; also handles local rows)
# ----------------------------------------------------------------------------------------------


def _torch_prep(image, text, logit_scale):
    """``_triton_prep`` in PyTorch: inv [2, N] and the flags [image ok, text ok, scale ok]."""
    acc = _acc_dtype(image.dtype)
    # dtype= accumulates in fp32 without materialising an fp32 copy of the features.
    norms = torch.stack([torch.linalg.vector_norm(x, dim=-1, dtype=acc) for x in (image, text)])
    ok = torch.cat([torch.isfinite(norms).all(1),
                    (torch.isfinite(logit_scale) & (logit_scale > 0)).reshape(1)])
    return norms.clamp_min(_NORM_EPS).reciprocal(), ok, 1


def _check_prep_flags(ok, blocks, logit_scale, flag=None):
    """Raises (CPU) or queues a device assertion (CUDA: raising would need a host sync) when the
    flags of the prep pass [image blocks, text blocks, logit_scale] report a bad input. ``flag``
    (Triton path): their conjunction, reduced by ``_fwd_finish_kernel``, so that CUDA asserts on
    one int without a reduction launch of its own."""
    if ok.device.type != "cpu":
        torch._assert_async(flag if flag is not None else ok.all(),
                            f"{_OP}: image_feats and text_feats must be finite and "
                            f"logit_scale positive and finite")
        return
    if bool(flag if flag is not None else ok.all()):
        return
    for name, flags in (("image_feats", ok[:blocks]), ("text_feats", ok[blocks:2 * blocks])):
        if not bool(flags.all()):
            raise ValueError(f"{_OP}: {name} contains non-finite values (nan or inf) or a row "
                             f"too large to normalise (its squared norm overflows)")
    raise ValueError(f"{_OP}: logit_scale must be positive and finite, got {logit_scale.item()}")


def _torch_rows_fwd(q, k, inv_q, inv_k, ids_q, ids_k, scale, uniform, mode):
    acc = inv_q.dtype
    s = scale.to(acc) * ((q.to(acc) * inv_q[:, None]) @ (k.to(acc) * inv_k[:, None]).t())
    pos = ids_q[:, None] == ids_k[None, :]
    lse = torch.logsumexp(s, dim=1)
    pos_sum = torch.where(pos, s, 0.0).sum(1)
    pos_cnt = pos.sum(1).to(acc)
    row_sum = s.sum(1)
    neg = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
    if mode != 0:
        masked = s.masked_fill(pos, float("-inf"))
        best, idx = masked.max(1)  # first index on ties, as the kernel
        has_candidate = best > float("-inf")
        if mode == 1:
            # Inverse CDF of softmax over the candidates with one uniform u in (0, 1) per row:
            # the first column whose cumulative weight reaches u · mass (zero-weight columns are
            # never taken) — the dense counterpart of the kernels' reservoir, O(B) random numbers.
            cum = torch.exp(masked - torch.where(has_candidate, best, 0.0)[:, None]).cumsum(1)
            target = uniform.to(acc) * cum[:, -1]
            idx = (cum < target[:, None]).sum(1)
        neg = torch.where(has_candidate, idx, neg)
    return lse, pos_sum, pos_cnt, row_sum, neg


def _torch_grad_logits(q, k, inv_q, inv_k, ids_q, ids_k, scale, weight, lse, pos_cnt, keep, smooth):
    acc = inv_q.dtype
    cos = (q.to(acc) * inv_q[:, None]) @ (k.to(acc) * inv_k[:, None]).t()
    s = scale.to(acc) * cos
    pos = ids_q[:, None] == ids_k[None, :]
    target = pos.to(acc) * (keep / pos_cnt)[:, None] + smooth
    g = weight.to(acc) * (torch.exp(s - lse[:, None]) - target)
    return g, cos


# ----------------------------------------------------------------------------------------------
# The op: implementations, torch.library custom ops (torch.compile), autograd.Function (eager)
# ----------------------------------------------------------------------------------------------


def _combine_distributed(image, text, inv, dq, dk, row_start, normalize=True):
    """Gradients of (image, text) from the local rows' dq [2, n_local, D] and the gathered
    columns' dk [2, N, D] (w.r.t. the normalised features), through the normalisation."""
    rows = slice(row_start, row_start + dq.shape[1])
    # dk[0] is the text-column gradient of the image rows, dk[1] the image-column one.
    d_hat_image, d_hat_text = dk[1], dk[0]
    d_hat_image[rows] += dq[0]
    d_hat_text[rows] += dq[1]
    grads = []
    for x, inv_x, dh in ((image, inv[0], d_hat_image), (text, inv[1], d_hat_text)):
        if not normalize:  # raw dot products: the features are the "normalised" ones
            grads.append(dh.to(x.dtype, copy=True))  # a view of dk would alias the other output
            continue
        # Backward of x̂ = x / ||x||: dx = (dx̂ - x̂ (x̂·dx̂)) / ||x||  (O(B·D), fp32).
        x_hat = x.to(dh.dtype) * inv_x[:, None]
        dx = (dh - x_hat * (x_hat * dh).sum(-1, keepdim=True)) * inv_x[:, None]
        grads.append(dx.to(x.dtype))
    return grads


@autocast_free  # the op's own dtype rules hold under autocast (its rule is applied at entry)
def _forward_impl(image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                  label_smoothing, mode, backend, normalize=True):
    """Returns (loss, negatives [2, n_local], lse [2, n_local], pos_cnt [2, n_local], inv [2, N]).

    ``image``/``text`` are the gathered [N, D] features, the local rows are
    ``row_start:row_start + n_local``; row 0 of the [2, n_local] outputs is the image→text
    direction, row 1 text→image. lse, pos_cnt and the inverse norms are what the backward
    recomputes the tiles from. ``ids`` None: pair i is the only positive of i. ``normalize``
    False: raw dot products (inv = 1, the prep pass still checks the features are finite)."""
    n = image.shape[0]
    keep, smooth = 1.0 - label_smoothing, label_smoothing / n
    if backend == "triton":
        image, text = image.contiguous(), text.contiguous()
        inv, ok, blocks = _triton_prep(image, text, logit_scale)
        if not normalize:
            inv = torch.ones_like(inv)
        loss, neg, lse, pos_cnt, flag = _triton_fwd(image, text, inv, ids, logit_scale, seeds,
                                                    row_start, n_local, keep, smooth, mode, ok)
        # after the sweep: its finish kernel reduces the flags (on bad input the outputs are
        # garbage that never reaches the caller: CPU raises, CUDA's assertion fails the stream)
        _check_prep_flags(ok, blocks, logit_scale, flag)
        return loss, neg, lse, pos_cnt, inv
    inv, ok, blocks = _torch_prep(image, text, logit_scale)
    _check_prep_flags(ok, blocks, logit_scale)
    if not normalize:
        inv = torch.ones_like(inv)
    if ids is None:
        ids = torch.arange(n, device=image.device)
    rows = slice(row_start, row_start + n_local)
    outs = []
    for d, (q, k, inv_q, inv_k) in enumerate(((image, text, inv[0], inv[1]),
                                             (text, image, inv[1], inv[0]))):
        lse_d, pos_sum, cnt_d, row_sum, neg_d = _torch_rows_fwd(
            q[rows], k, inv_q[rows], inv_k, ids[rows], ids, logit_scale,
            None if uniforms is None else uniforms[d], mode)
        # -Σ_j target_ij log softmax(s)_ij with the smoothed multi-positive target.
        outs.append((lse_d - keep * pos_sum / cnt_d - smooth * row_sum, lse_d, cnt_d, neg_d))
    row_loss, lse, pos_cnt, neg = (torch.stack(t) for t in zip(*outs))
    # ½ (mean over image rows + mean over text rows)
    return row_loss.sum() * (0.5 / n_local), neg, lse, pos_cnt, inv


@autocast_free
def _backward_impl(grad_loss, image, text, logit_scale, ids, inv, lse, pos_cnt, row_start,
                   label_smoothing, backend, normalize=True):
    """Gradients of the loss w.r.t. the gathered image and text features and logit_scale."""
    n, dim = image.shape
    n_local = lse.shape[1]
    acc = _acc_dtype(image.dtype)
    keep, smooth = 1.0 - label_smoothing, label_smoothing / n
    if backend == "triton":
        d_image, d_text, d_scale = _triton_bwd(
            grad_loss.to(acc).reshape(()), image.contiguous(), text.contiguous(), inv, ids,
            logit_scale, lse, pos_cnt, row_start, keep, smooth, normalize)
        return d_image, d_text, d_scale.to(logit_scale.dtype)
    if ids is None:
        ids = torch.arange(n, device=image.device)
    # Every row loss enters with weight 1/2 · 1/n_local (two directions, mean over local rows).
    weight = (grad_loss.to(acc) * (0.5 / n_local)).reshape(())
    rows = slice(row_start, row_start + n_local)
    dq = torch.empty(2, n_local, dim, dtype=acc, device=image.device)
    dk = torch.empty(2, n, dim, dtype=acc, device=image.device)
    d_scale = torch.zeros((), dtype=acc, device=image.device)
    s = logit_scale.to(acc)
    for d, (q, k, inv_q, inv_k) in enumerate(((image, text, inv[0], inv[1]),
                                             (text, image, inv[1], inv[0]))):
        g, cos = _torch_grad_logits(q[rows], k, inv_q[rows], inv_k, ids[rows], ids, logit_scale,
                                    weight, lse[d], pos_cnt[d], keep, smooth)
        dq[d] = s * (g @ (k.to(acc) * inv_k[:, None]))
        dk[d] = s * (g.t() @ (q[rows].to(acc) * inv_q[rows, None]))
        d_scale = d_scale + (g * cos).sum()
    d_image, d_text = _combine_distributed(image, text, inv, dq, dk, row_start, normalize)
    return d_image, d_text, d_scale.to(logit_scale.dtype)


@torch.library.custom_op("unigen::contrastive_loss_fwd", mutates_args=())
def _contrastive_fwd_op(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    ids: Optional[torch.Tensor],
    seeds: Optional[torch.Tensor],
    uniforms: Optional[torch.Tensor],
    row_start: int,
    n_local: int,
    label_smoothing: float,
    mode: int,
    backend: str,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_forward_impl`` as one opaque node for torch.compile."""
    return _forward_impl(image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                         label_smoothing, mode, backend, normalize)


@_contrastive_fwd_op.register_fake
def _(image, text, logit_scale, ids, seeds, uniforms, row_start, n_local, label_smoothing, mode,
      backend, normalize):
    acc = _acc_dtype(image.dtype)
    return (image.new_empty((), dtype=acc), image.new_empty((2, n_local), dtype=torch.int64),
            image.new_empty((2, n_local), dtype=acc), image.new_empty((2, n_local), dtype=acc),
            image.new_empty((2, image.shape[0]), dtype=acc))


@torch.library.custom_op("unigen::contrastive_loss_bwd", mutates_args=())
def _contrastive_bwd_op(
    grad_loss: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: torch.Tensor,
    ids: Optional[torch.Tensor],
    inv: torch.Tensor,
    lse: torch.Tensor,
    pos_cnt: torch.Tensor,
    row_start: int,
    label_smoothing: float,
    backend: str,
    normalize: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_backward_impl`` as one opaque node for torch.compile."""
    return _backward_impl(grad_loss, image, text, logit_scale, ids, inv, lse, pos_cnt, row_start,
                          label_smoothing, backend, normalize)


@_contrastive_bwd_op.register_fake
def _(grad_loss, image, text, logit_scale, ids, inv, lse, pos_cnt, row_start, label_smoothing,
      backend, normalize):
    return torch.empty_like(image), torch.empty_like(text), torch.empty_like(logit_scale)


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, ids, _, _, row_start, _, label_smoothing, _, backend, normalize = inputs
    _, _, lse, pos_cnt, inv = output
    ctx.save_for_backward(image, text, logit_scale, ids, inv, lse, pos_cnt)
    ctx.row_start, ctx.label_smoothing, ctx.backend = row_start, label_smoothing, backend
    ctx.normalize = normalize


def _backward(ctx, grad_loss, *unused_grads):
    d_image, d_text, d_scale = _contrastive_bwd_op(
        grad_loss, *ctx.saved_tensors, ctx.row_start, ctx.label_smoothing, ctx.backend, ctx.normalize)
    return d_image, d_text, d_scale, None, None, None, None, None, None, None, None, None


_contrastive_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _ContrastiveLossFunction(torch.autograd.Function):
    """The same forward and backward for eager mode, without the custom-op dispatcher.

    At training batch sizes (B = 4096, D = 256) the kernels take tens of microseconds on a GPU,
    so a step costs what the host spends launching them; the custom-op path adds ~40 µs of
    dispatch per forward + backward (measured on CPU). ``contrastive_loss`` takes the custom
    op while torch.compile traces and this Function otherwise; both run ``_forward_impl`` and
    ``_backward_impl``."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                label_smoothing, mode, backend, normalize):
        inputs = (image, text, logit_scale, ids, seeds, uniforms, row_start, n_local,
                  label_smoothing, mode, backend, normalize)
        output = _forward_impl(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for those four outputs
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, *unused_grads):
        d_image, d_text, d_scale = _backward_impl(
            grad_loss, *ctx.saved_tensors, ctx.row_start, ctx.label_smoothing, ctx.backend, ctx.normalize)
        return d_image, d_text, d_scale, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Functional and module
# ----------------------------------------------------------------------------------------------


def _resolve_group(process_group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            raise RuntimeError(f"{_OP}: process_group given but torch.distributed is not initialised")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _check_rank_sizes(rank_sizes, n_local, group):
    """``rank_sizes`` as a list of ints, validated against what this rank knows without
    communicating: one entry per rank of the group (or one, without a group), non-negative ints,
    this rank's entry equal to its number of pairs. Every rank must pass the same list (another
    rank's entry cannot be checked without the very host sync it saves)."""
    import torch.distributed as dist

    if isinstance(rank_sizes, (str, bytes)) or not hasattr(rank_sizes, "__len__"):
        raise TypeError(f"{_OP}: rank_sizes must be a sequence of ints (pairs per rank), got "
                        f"{type(rank_sizes).__name__}")
    sizes = list(rank_sizes)
    world, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    if len(sizes) != world:
        raise ValueError(f"{_OP}: rank_sizes must have one entry per rank ({world}), got {len(sizes)}")
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in sizes):
        raise ValueError(f"{_OP}: rank_sizes must hold non-negative ints, got {sizes}")
    if sizes[rank] != n_local:
        raise ValueError(f"{_OP}: rank_sizes[{rank}] = {sizes[rank]} but this rank holds {n_local} "
                         f"pairs (image_feats.shape[0])")
    return sizes


def _gather(image_feats, text_feats, ids, group, sizes=None):
    """All-gather features with gradient (the backward reduce-scatters every rank's gradient back
    to the owner, as open_clip's ``gather_with_grad``) and ids without. Ranks may hold different
    numbers of pairs (a mixed-task batch carries a varying number, possibly 0): the rows are
    padded to the largest, gathered, and the padding dropped (slices and one concatenation,
    sizes known on the host). ``sizes`` (the caller's ``rank_sizes``) makes that a step without
    a host sync; without it the sizes are gathered first — one small host-device sync.
    Without ``ids`` the gathered batch keeps pair i's positive at column i (ranks in order,
    padding dropped), so no ids are made or gathered. Functional collectives keep the gathers
    traceable by torch.compile."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    # Newer torch names the gather-along-dim-0 collectives *_single (the *_tensor names warn as
    # deprecated); older releases (e.g. torch 2.11) only have *_tensor.
    gather_grad = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    rank = dist.get_rank(group)
    device = image_feats.device
    n_local = image_feats.shape[0]
    if sizes is None:
        sizes = funcol.wait_tensor(gather(torch.tensor([n_local], device=device), 0, group)).tolist()
    n_max = max(sizes)
    pad = n_max - n_local
    image_all = funcol.wait_tensor(gather_grad(F.pad(image_feats, (0, 0, 0, pad)).contiguous(), 0, group))
    text_all = funcol.wait_tensor(gather_grad(F.pad(text_feats, (0, 0, 0, pad)).contiguous(), 0, group))
    gathered = [image_all, text_all]
    if ids is not None:
        gathered.append(funcol.wait_tensor(gather(F.pad(ids, (0, pad)).contiguous(), 0, group)))
    if min(sizes) != n_max:
        gathered = [torch.cat([x[r * n_max:r * n_max + k] for r, k in enumerate(sizes)])
                    for x in gathered]
    ids_all = gathered[2] if ids is not None else None
    return gathered[0], gathered[1], ids_all, sum(sizes[:rank])


def contrastive_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    logit_scale,
    *,
    ids: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    negatives: Optional[str] = "sample",
    generator: Optional[torch.Generator] = None,
    process_group=None,
    backend: str = "auto",
    normalize: bool = True,
    rank_sizes: Optional[Sequence[int]] = None,
) -> ContrastiveLossOutput:
    """Symmetric InfoNCE on ``logit_scale · cos(image_feats, text_feats)`` with hard-negative mining.

    Args:
        image_feats, text_feats: ``[B, D]`` float features of the B local pairs (same dtype).
        logit_scale: the multiplier (``exp`` of the log-temperature), a 0-d / 1-element tensor (it
            receives a gradient) or a Python number; must be positive and finite.
        ids: optional ``[B]`` int32/int64 pair ids; pairs sharing an id are all positives of each
            other (multi-positive targets, never mined). Default: pair i is the only positive of i.
        label_smoothing: ε in [0, 1): target = (1-ε)·uniform(positives) + ε·uniform(batch).
        negatives: ``"sample"`` (∝ softmax of the similarity over the non-positives), ``"hardest"``
            (argmax) or None (no mining).
        generator: a ``torch.Generator`` on the features' device for reproducible sampling.
        process_group: all-gather over this group (default: the default group when
            ``torch.distributed`` is initialised with more than one rank).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (``"cpp"`` raises: no C++ op).
        normalize: True (default): similarity = cosine. False: raw dot products
            ``logit_scale · image_feats @ text_featsᵀ`` for features the caller has normalised
            itself (open_clip's convention), with the exact gradient of that formula (no
            projection through a normalisation).
        rank_sizes: optional, under a process group: the number of pairs every rank holds this
            step (``rank_sizes[r]`` for rank r of the group, the same list on every rank; this
            rank's entry must equal ``image_feats.shape[0]``). Given, the gather needs no host
            sync (the sizes are not gathered, and padding is dropped with host-known slices);
            omitted, the sizes are gathered first, which reads them on the host once a step
            (a device sync on GPUs). The result is the same either way.

    Returns:
        ``ContrastiveLossOutput(loss, neg_text_for_image, neg_image_for_text)``; the negatives are
        int64 indices into the gathered batch (``[B]`` local rows), -1 where a row has no
        non-positive candidate.

    Autocast: under ``torch.autocast`` the features are cast to the autocast dtype (as the
    similarity matmul would be); the math stays fp32 and the loss is fp32.
    """
    if isinstance(image_feats, torch.Tensor):
        image_feats, text_feats = cast_inputs(autocast_dtype(image_feats.device), image_feats, text_feats)
    check_tensor(image_feats, "image_feats", op=_OP, ndim=2, dtypes=FLOAT_DTYPES)
    device = image_feats.device
    check_tensor(text_feats, "text_feats", op=_OP, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    if text_feats.dtype != image_feats.dtype:
        raise TypeError(f"{_OP}: image_feats and text_feats must have the same dtype, got "
                        f"{image_feats.dtype} and {text_feats.dtype}")
    if image_feats.shape[0] != text_feats.shape[0]:
        raise ValueError(f"{_OP}: image_feats and text_feats must have the same batch size, got "
                         f"{image_feats.shape[0]} and {text_feats.shape[0]}")
    if image_feats.shape[1] != text_feats.shape[1]:
        raise ValueError(f"{_OP}: image_feats and text_feats must have the same feature dim, got "
                         f"{image_feats.shape[1]} and {text_feats.shape[1]}")
    n_local, dim = image_feats.shape
    group = _resolve_group(process_group)
    # Under data parallelism a rank may hold no pair this step; it still joins the gathers.
    if (n_local == 0 and group is None) or dim == 0:
        raise ValueError(f"{_OP}: image_feats is empty (shape {tuple(image_feats.shape)})")
    if negatives not in _NEGATIVE_MODES:
        raise ValueError(f"{_OP}: negatives must be 'sample', 'hardest' or None, got {negatives!r}")
    mode = _NEGATIVE_MODES[negatives]
    if not isinstance(normalize, bool):
        raise TypeError(f"{_OP}: normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
    if ids is not None:
        check_tensor(ids, "ids", op=_OP, ndim=1, dtypes=INDEX_DTYPES, device=device)
        if ids.shape[0] != n_local:
            raise ValueError(f"{_OP}: ids must have one entry per pair ({n_local}), got {ids.shape[0]}")
        ids = ids.to(torch.int64).contiguous()
    if isinstance(logit_scale, torch.Tensor):
        check_tensor(logit_scale, "logit_scale", op=_OP, dtypes=FLOAT_DTYPES, device=device)
        if logit_scale.numel() != 1:
            raise ValueError(f"{_OP}: logit_scale must hold one value, got shape {tuple(logit_scale.shape)}")
        logit_scale = logit_scale.reshape(())
    elif isinstance(logit_scale, (int, float)):
        if not (math.isfinite(logit_scale) and logit_scale > 0):
            raise ValueError(f"{_OP}: logit_scale must be positive and finite, got {logit_scale}")
        logit_scale = torch.tensor(float(logit_scale), dtype=_acc_dtype(image_feats.dtype), device=device)
    else:
        raise TypeError(f"{_OP}: logit_scale must be a tensor or a number, got {type(logit_scale).__name__}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"{_OP}: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"{_OP}: generator is on {generator.device} but the features are on {device}")

    # Non-finite features and a non-positive logit_scale are caught by the op's first pass over
    # the features (it computes their norms): a ValueError on CPU, a device-side assertion on
    # CUDA, where raising would need a host sync (_check_prep_flags).

    be = resolve_backend(backend, device, op=_OP, has_cpp=False)

    sizes = None if rank_sizes is None else _check_rank_sizes(rank_sizes, n_local, group)
    if group is not None:
        image_all, text_all, ids_all, row_start = _gather(image_feats, text_feats, ids, group, sizes)
    else:
        image_all, text_all, ids_all, row_start = image_feats, text_feats, ids, 0
    n = image_all.shape[0]
    if n < 2 and group is None:
        raise ValueError(f"{_OP}: needs at least 2 image-text pairs in the batch, got {n}")
    if n_local == 0 or n < 2:
        # No local rows, or a gathered batch of one pair (no negative exists): a zero loss that
        # still reaches the gathered features, so this rank takes part in the backward's
        # reduce-scatter like the others; no negative can be mined (-1).
        loss = (image_all.sum() + text_all.sum()) * 0.0 * logit_scale
        none = torch.full((n_local,), -1, dtype=torch.int64, device=device)
        return ContrastiveLossOutput(loss, *((None, None) if mode == 0 else (none, none.clone())))
    return _contrastive_on_gathered(image_all, text_all, logit_scale, ids_all, row_start, n_local,
                                    float(label_smoothing), mode, generator, be, backend, normalize)


def _contrastive_on_gathered(image_all, text_all, logit_scale, ids_all, row_start, n_local,
                             label_smoothing, mode, generator, be, backend, normalize):
    """The op on an already gathered batch: the loss of rows ``row_start:row_start + n_local``
    (both directions) against all N columns, with the exact gradient w.r.t. ``image_all`` and
    ``text_all``. ``contrastive_loss`` gathers first; ``ClipLoss`` gathers the way open_clip does."""
    n, dim = image_all.shape
    device = image_all.device
    # The kernels keep a feature row on chip (D ≤ 1024) and index with int32 (2·N·D < 2^31).
    if be == "triton" and (dim > _TRITON_MAX_DIM or 2 * n * dim >= 2**31):
        if backend == "triton":
            raise ValueError(f"{_OP}: backend='triton' supports feature dim ≤ {_TRITON_MAX_DIM} and "
                             f"2·batch·dim < 2^31, got batch {n}, dim {dim}")
        be = "torch"

    seeds = uniforms = None
    if mode == 1:
        if be == "triton":
            # One int64 Philox seed, drawn on device from the generator (no host sync,
            # reproducible with an explicit generator); the kernels' counters name the row, the
            # column tile or split, the stage and the direction of every draw.
            seeds = torch.randint(0, 2**62, (1,), generator=generator, device=device, dtype=torch.int64)
        else:
            # one uniform in (0, 1) per row and direction: torch.rand's fp32 draws are multiples
            # of 2^-24 in [0, 1), shifted by half a step
            uniforms = torch.rand(2, n_local, generator=generator, device=device) + 2.0**-25

    # torch.compile traces the custom op; eager mode skips its dispatcher (host time is what a
    # step at training batch sizes costs: see _ContrastiveLossFunction).
    op = _contrastive_fwd_op if torch.compiler.is_compiling() else _ContrastiveLossFunction.apply
    loss, neg, _, _, _ = op(image_all, text_all, logit_scale, ids_all, seeds, uniforms, row_start,
                            n_local, label_smoothing, mode, be, normalize)
    if mode == 0:
        return ContrastiveLossOutput(loss, None, None)
    return ContrastiveLossOutput(loss, neg[0], neg[1])


class ContrastiveLoss(torch.nn.Module):
    """Symmetric InfoNCE with a learnable temperature and hard-negative mining.

    Owns ``log_logit_scale`` (log of the multiplier, i.e. -log τ), initialised to log(1/0.07) and
    clamped to at most log(100) in the forward, as CLIP does.
    """

    def __init__(self, *, init_temperature: float = 0.07, max_logit_scale: float = 100.0,
                 learnable_temperature: bool = True, label_smoothing: float = 0.0,
                 negatives: Optional[str] = "sample", process_group=None, backend: str = "auto"):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"ContrastiveLoss: init_temperature must be positive, got {init_temperature}")
        if not max_logit_scale > 0:
            raise ValueError(f"ContrastiveLoss: max_logit_scale must be positive, got {max_logit_scale}")
        value = torch.tensor(math.log(1.0 / init_temperature))
        if learnable_temperature:
            self.log_logit_scale = torch.nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.label_smoothing = label_smoothing
        self.negatives = negatives
        self.process_group = process_group
        self.backend = backend

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def forward(self, image_feats, text_feats, *, ids=None, generator=None,
                rank_sizes=None) -> ContrastiveLossOutput:
        return contrastive_loss(
            image_feats, text_feats, self.logit_scale, ids=ids, label_smoothing=self.label_smoothing,
            negatives=self.negatives, generator=generator, process_group=self.process_group,
            backend=self.backend, rank_sizes=rank_sizes)

    def extra_repr(self) -> str:
        return (f"label_smoothing={self.label_smoothing}, negatives={self.negatives!r}, "
                f"max_logit_scale={math.exp(self.max_log_logit_scale):g}, backend={self.backend!r}")
