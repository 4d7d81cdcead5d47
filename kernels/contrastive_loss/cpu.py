"""The dense PyTorch implementation of the fused contrastive loss's interface: ``backend="torch"``,
what ``"auto"`` runs on CPU. It computes the same row statistics, mined negatives and
gradients as the Triton kernels (one uniform per row and direction where the kernels run a
reservoir: the same law), on dense [rows, N] blocks, and handles the local rows of a
distributed batch. The op's implementations (:mod:`.op`) assemble the forward and backward from
these pieces; the Triton launchers share the input check and the normalisation's backward.
"""

from __future__ import annotations

import torch

from .reference import _NORM_EPS, _OP, _acc_dtype


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
