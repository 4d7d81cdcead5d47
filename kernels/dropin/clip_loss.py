"""``ClipLoss``: open_clip's ``ClipLoss`` contract on the fused contrastive op.

open_clip (``src/open_clip/loss.py``) computes, from features its models have already
L2-normalised, ``logits_per_image = logit_scale · image @ textᵀ`` (+ ``logit_bias``) and the mean of
the two cross-entropies against ``arange`` labels. Distributed (``world_size > 1``) it first gathers
the features of every rank:

- ``gather_with_grad=True``: an all-gather with autograd (its backward sums every rank's gradient
  of the gathered copy onto the owner);
- ``gather_with_grad=False``: a plain all-gather; the gathered copies are constants, except that
  with ``local_loss=False`` this rank's own slot is replaced by its local (differentiable) features;

and then either ``local_loss=False``: the whole [N, N] loss on every rank, or ``local_loss=True``:
the loss of this rank's rows against all N columns (labels offset by ``n·rank``).

This class gathers exactly as open_clip does and runs the fused op (raw dot products,
``normalize=False``: no renormalisation, the formula's exact gradient) on the gathered batch, for
the rows the mode asks for. The op takes both row and column roles from the same gathered tensors,
which is exact for every mode but one: ``local_loss=True, gather_with_grad=False``, where open_clip's
rows are the differentiable local features and its columns detached copies (so no gradient flows
through the columns); that mode runs open_clip's formula itself (dense [n, N] logits, as open_clip).
A ``logit_bias`` that is one value shifts every logit of a row alike, which leaves the softmax
cross-entropy unchanged: it receives its (zero) gradient and the fused op runs; a tensor-valued bias
runs the formula. ``use_horovod=True`` is refused.

Optionally (``negatives="sample"`` or ``"hardest"``) the mined hard negatives of the op come back as
well: indices into the gathered batch for the rows the loss covers (all N with
``local_loss=False``, this rank's n with ``local_loss=True``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.autocast import autocast_dtype, cast_inputs
from ..common.backend import resolve_backend
from ..common.checks import FLOAT_DTYPES, check_tensor
from ..contrastive_loss import _NEGATIVE_MODES, _contrastive_on_gathered

OP = "ClipLoss"


def _all_gather_with_grad(x):
    """open_clip's gather with gradient (functional collective with autograd)."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    # newer torch names it *_single_autograd, older releases only have *_tensor_autograd
    gather = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
    return funcol.wait_tensor(gather(x.contiguous(), 0, dist.group.WORLD))


def gather_features(image_features, text_features, *, local_loss, gather_with_grad, rank, world_size):
    """open_clip's ``gather_features``: the gathered [world_size·n, D] image and text features."""
    import torch.distributed as dist

    if gather_with_grad:
        return _all_gather_with_grad(image_features), _all_gather_with_grad(text_features)
    gathered_image = [torch.zeros_like(image_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_image, image_features.contiguous())
    dist.all_gather(gathered_text, text_features.contiguous())
    if not local_loss:
        # the local slot carries this rank's gradient (the gathered copies carry none)
        gathered_image[rank] = image_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_image, dim=0), torch.cat(gathered_text, dim=0)


class ClipLoss(torch.nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss`` on the fused contrastive op.

    Args (open_clip's):
        local_loss: each rank computes the loss of its own rows against all gathered columns.
        gather_with_grad: gather the features with autograd (gradients flow across ranks).
        cache_labels: accepted for compatibility (the fused op builds no label tensor; the formula
            fallback caches its labels as open_clip does).
        rank, world_size: this process's rank and the number of ranks (must match
            ``torch.distributed`` when ``world_size > 1``).
        use_horovod: older open_clip's Horovod gather; refused (True raises).
    Extra:
        negatives: ``None`` (default: open_clip's return), ``"sample"`` or ``"hardest"``: also
            return the mined hard negatives (see :func:`unigen.kernels.contrastive_loss`).
        backend: the op's backend.

    ``forward(image_features, text_features, logit_scale, logit_bias=None, output_dict=False)``
    returns the loss (or ``{"contrastive_loss": loss}``), as open_clip; with ``negatives`` a tuple
    ``(loss, neg_text_for_image, neg_image_for_text)`` (or a dict with those keys too).
    Under ``torch.autocast`` the features are cast to the autocast dtype and the loss is fp32.
    Output dtype: the loss is fp32 (fp64 for fp64 features) in every mode, the rule of every
    fused op; open_clip returns the features' dtype (bf16 for bf16 features without autocast),
    the same value rounded to it.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False, *, negatives=None, generator=None, backend="auto"):
        super().__init__()
        if use_horovod:
            raise ValueError(f"{OP}: use_horovod=True is not supported (the gathers use "
                             f"torch.distributed); launch with torchrun instead")
        if negatives not in _NEGATIVE_MODES:
            raise ValueError(f"{OP}: negatives must be 'sample', 'hardest' or None, got {negatives!r}")
        for name, value in (("rank", rank), ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{OP}: {name} must be an int, got {value!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{OP}: need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.negatives = negatives
        self.generator = generator
        self.backend = backend
        # open_clip's label cache (used by the formula fallback only)
        self.prev_num_logits = 0
        self.labels = {}

    # -- open_clip's pieces, for the formula fallback -------------------------------------------

    def get_ground_truth(self, device, num_logits) -> torch.Tensor:
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def _formula(self, image_features, text_features, all_image, all_text, logit_scale, logit_bias):
        if self.world_size > 1 and self.local_loss:
            logits_per_image = logit_scale * image_features @ all_text.T
            logits_per_text = logit_scale * text_features @ all_image.T
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0])
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2

    # -- the loss -------------------------------------------------------------------------------

    def _check(self, image_features, text_features, logit_scale, logit_bias):
        check_tensor(image_features, "image_features", op=OP, ndim=2, dtypes=FLOAT_DTYPES)
        device = image_features.device
        check_tensor(text_features, "text_features", op=OP, ndim=2, dtypes=FLOAT_DTYPES, device=device)
        if image_features.shape != text_features.shape:
            raise ValueError(f"{OP}: image_features {tuple(image_features.shape)} and text_features "
                             f"{tuple(text_features.shape)} must have the same shape")
        if image_features.dtype != text_features.dtype:
            raise TypeError(f"{OP}: image_features and text_features must have the same dtype, got "
                            f"{image_features.dtype} and {text_features.dtype}")
        if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
            raise ValueError(f"{OP}: logit_scale must be a one-element tensor, got "
                             f"{type(logit_scale).__name__}{tuple(getattr(logit_scale, 'shape', ()))}")
        if logit_bias is not None and (isinstance(logit_bias, bool) or not isinstance(logit_bias, torch.Tensor)):
            raise TypeError(f"{OP}: logit_bias must be a tensor or None, got {type(logit_bias).__name__} "
                            f"(pass output_dict by keyword)")
        if self.world_size > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(f"{OP}: world_size={self.world_size} but torch.distributed is not initialised")
            if (dist.get_rank(), dist.get_world_size()) != (self.rank, self.world_size):
                raise ValueError(f"{OP}: rank={self.rank}, world_size={self.world_size} disagree with "
                                 f"torch.distributed (rank {dist.get_rank()} of {dist.get_world_size()})")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        self._check(image_features, text_features, logit_scale, logit_bias)
        image_features, text_features = cast_inputs(autocast_dtype(image_features.device),
                                                    image_features, text_features)
        n = image_features.shape[0]
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size)
        else:
            all_image, all_text = image_features, text_features
        local = self.world_size > 1 and self.local_loss
        row_start, n_rows = (self.rank * n, n) if local else (0, all_image.shape[0])
        mode = _NEGATIVE_MODES[self.negatives]
        scalar_bias = logit_bias is None or logit_bias.numel() == 1
        # (a gathered batch of one pair has no negative: the formula's zero loss)
        exact = scalar_bias and not (local and not self.gather_with_grad) and all_image.shape[0] >= 2
        be = resolve_backend(self.backend, image_features.device, op=OP, has_cpp=False)
        scale = logit_scale.reshape(())
        neg_text = neg_image = None
        if exact:
            out = _contrastive_on_gathered(all_image, all_text, scale, None, row_start, n_rows, 0.0, mode,
                                           self.generator, be, self.backend, False)
            loss, neg_text, neg_image = out
            if logit_bias is not None:
                # a row-constant shift leaves the cross-entropy unchanged; the bias still joins
                # the graph so it receives its (exactly zero) gradient, as in open_clip
                loss = loss + 0.0 * logit_bias.sum()
        else:
            loss = self._formula(image_features, text_features, all_image, all_text, logit_scale, logit_bias)
            # the ops' output rule: fp32 (fp64 for fp64 features), as the fused path returns
            loss = loss.to(torch.float64 if image_features.dtype == torch.float64 else torch.float32)
            if mode and all_image.shape[0] >= 2:
                with torch.no_grad():  # mining only: the formula gives the loss and gradients
                    out = _contrastive_on_gathered(all_image, all_text, scale.detach(), None, row_start,
                                                   n_rows, 0.0, mode, self.generator, be, self.backend, False)
                neg_text, neg_image = out.neg_text_for_image, out.neg_image_for_text
        if mode == 0:
            return {"contrastive_loss": loss} if output_dict else loss
        if output_dict:
            return {"contrastive_loss": loss, "neg_text_for_image": neg_text, "neg_image_for_text": neg_image}
        return loss, neg_text, neg_image

    def extra_repr(self):
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, negatives={self.negatives!r}, backend={self.backend!r}")
