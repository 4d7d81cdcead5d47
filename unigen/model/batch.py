"""The training batch UniGen consumes: the one typed thing between the data layer and the model.

Building it is data-layer work: from examples (:func:`unigen.data.examples.collate_examples`,
tokenising and preprocessing images) or from the pre-training pipeline's task groups
(:func:`unigen.data.batches.batch_from_task_groups`).

One batch mixes every task of the paper (§3.3). It holds each distinct image and each distinct
encoder text once, and refers to them by index, so an image used by [cap], [qus], L_CL and
[match] is encoded by the ViT and the Q-Former once.

Layout (N_img images, N_txt encoder texts, S generative samples, P image-text pairs)::

    images           float [N_img, 3, H, W]   CLIP-normalised pixels (H = W = vision.image_size),
                                              or None when no sample uses an image
    image_features   [N_img, 1 + patches, W]  instead of `images`: the frozen ViT's output for
                                              each image, read from a feature store (fp32, bf16
                                              or fp8; see unigen.model.vit_features), or None
    image_feature_scales float32 [N_img]      fp8 features' per-image scales, else None
    text_ids         int64 [N_txt, L]         XLM-R token ids, right-padded with the pad id,
                                              L <= text.max_length (40), or None
    text_mask        bool  [N_txt, L]         True on real tokens (each row's True run starts at 0)
    task             int64 [S]                index into TASK_NAMES: 0 trans, 1 cap, 2 qus, 3 match
    image_index      int64 [S]                row of `images` the sample reads, -1 = none
    text_index       int64 [S]                row of `text_ids` the sample reads, -1 = none
    target_ids       int64 [T]                the S English targets (decoder token ids), packed
                                              back to back, each ending with the eos id
    target_cu_seqlens int32 [S + 1]           sample s's target is target_ids[cu[s]:cu[s+1]]
    pair_image_index int64 [P]                image of each L_CL / [match] pair
    pair_text_index  int64 [P]                text of each pair
    pair_ids         int64 [P]                pairs with equal ids are positives of each other
                                              (e.g. an image id: its captions in 6 languages);
                                              excluded from each other's negatives
    second_image_index int64 [S] or None      a second image the sample reads right after its
                                              first (E_v(left) ⊕ E_v(right): MaRVL/NLVR2's pair,
                                              each image at full resolution), -1 = none

Which inputs each task reads (decoder prefix, then the task token, then the target; §3.3):

    trans  text (any language)            → English translation     image_index = -1
    cap    image                          → English caption         text_index  = -1
    qus    image ⊕ text (the question)    → answer
    match  image ⊕ text                   → "yes" / "no"

[match] samples need not be in the batch: the model builds them from the pairs (each pair answers
"yes"; with LossConfig.match_negatives, a mined hard-negative text and a mined hard-negative image
per pair answer "no"). Explicit [match] samples (e.g. labelled negatives) may be added as well.
A batch may lack any task; P may be 0 (then L_CL and the mined [match] are 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from unigen.model.config import TASK_IDS, TASK_NAMES


@dataclass
class UniGenBatch:
    """A packed multi-task training batch (layout in the module docstring)."""

    task: torch.Tensor
    image_index: torch.Tensor
    text_index: torch.Tensor
    target_ids: torch.Tensor
    target_cu_seqlens: torch.Tensor
    images: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    pair_image_index: torch.Tensor | None = None
    pair_text_index: torch.Tensor | None = None
    pair_ids: torch.Tensor | None = None
    second_image_index: torch.Tensor | None = None
    image_features: torch.Tensor | None = None
    image_feature_scales: torch.Tensor | None = None

    def __post_init__(self):
        dev = self.task.device if isinstance(self.task, torch.Tensor) else None
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        if self.pair_image_index is None:
            self.pair_image_index = empty
        if self.pair_text_index is None:
            self.pair_text_index = empty.clone()
        if self.pair_ids is None and isinstance(self.pair_image_index, torch.Tensor):
            # Default: every pair is only its own positive.
            self.pair_ids = torch.arange(self.pair_image_index.numel(), device=dev)

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self.task.numel())

    @property
    def num_pairs(self) -> int:
        return int(self.pair_image_index.numel())

    @property
    def num_images(self) -> int:
        if self.image_features is not None:
            return int(self.image_features.shape[0])
        return 0 if self.images is None else int(self.images.shape[0])

    @property
    def num_texts(self) -> int:
        return 0 if self.text_ids is None else int(self.text_ids.shape[0])

    def target_lengths(self) -> torch.Tensor:
        return (self.target_cu_seqlens[1:] - self.target_cu_seqlens[:-1]).long()

    def num_input_tokens(self, num_query_tokens: int) -> int:
        """Tokens the model reads besides the targets: every text's real tokens and the
        Q-Former queries of every image (for tokens/s and the MFU estimate; call it on the host
        copy, it sums the mask)."""
        n = int(self.text_mask.sum()) if self.text_mask is not None else 0
        return n + self.num_images * num_query_tokens

    def task_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.task.long(), minlength=len(TASK_NAMES)).tolist()
        return {name: int(c) for name, c in zip(TASK_NAMES, counts)}

    # ---- movement ----------------------------------------------------------------------------
    def to(self, device, non_blocking: bool = False) -> "UniGenBatch":
        return dataclasses.replace(self, **{
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    def pin_memory(self) -> "UniGenBatch":
        return dataclasses.replace(self, **{
            f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    # ---- validation --------------------------------------------------------------------------
    def validate(self, *, image_size: int | None = None, max_text_length: int | None = None,
                 decoder_vocab_size: int | None = None, text_vocab_size: int | None = None) -> None:
        """Raise a ValueError/TypeError naming the field on any malformed part."""

        def tensor(name, ndim, dtypes):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"UniGenBatch.{name} must be a torch.Tensor, got {type(v).__name__}")
            if v.dim() != ndim:
                raise ValueError(f"UniGenBatch.{name} must have {ndim} dims, got shape {tuple(v.shape)}")
            if v.dtype not in dtypes:
                raise TypeError(f"UniGenBatch.{name} has dtype {v.dtype}, expected one of {dtypes}")
            return v

        ints = (torch.int64, torch.int32)
        task = tensor("task", 1, ints)
        S = task.numel()
        for name in ("image_index", "text_index"):
            if tensor(name, 1, ints).numel() != S:
                raise ValueError(f"UniGenBatch.{name} has {getattr(self, name).numel()} entries, "
                                 f"task has {S}")
        if S and (int(task.min()) < 0 or int(task.max()) >= len(TASK_NAMES)):
            raise ValueError(f"UniGenBatch.task must hold ids in [0, {len(TASK_NAMES)}) ({TASK_NAMES}), "
                             f"got values in [{int(task.min())}, {int(task.max())}]")
        cu = tensor("target_cu_seqlens", 1, ints)
        tgt = tensor("target_ids", 1, ints)
        if cu.numel() != S + 1:
            raise ValueError(f"UniGenBatch.target_cu_seqlens must have S + 1 = {S + 1} entries, "
                             f"got {cu.numel()}")
        if int(cu[0]) != 0 or int(cu[-1]) != tgt.numel():
            raise ValueError(f"UniGenBatch.target_cu_seqlens must start at 0 and end at "
                             f"len(target_ids) = {tgt.numel()}, got {int(cu[0])}..{int(cu[-1])}")
        if S and bool(((cu[1:] - cu[:-1]) < 1).any()):
            raise ValueError("UniGenBatch: every target needs at least one token (the eos)")
        if decoder_vocab_size is not None and tgt.numel() and (
                int(tgt.min()) < 0 or int(tgt.max()) >= decoder_vocab_size):
            raise ValueError(f"UniGenBatch.target_ids must be in [0, {decoder_vocab_size}), got "
                             f"values in [{int(tgt.min())}, {int(tgt.max())}]")

        if self.images is not None:
            im = tensor("images", 4, (torch.float32, torch.float16, torch.bfloat16))
            if im.shape[1] != 3:
                raise ValueError(f"UniGenBatch.images must be [N, 3, H, W], got {tuple(im.shape)}")
            if image_size is not None and tuple(im.shape[2:]) != (image_size, image_size):
                raise ValueError(f"UniGenBatch.images must be {image_size}x{image_size} "
                                 f"(vision.image_size), got {tuple(im.shape[2:])}")
            _check_finite("images", im)
        if self.image_features is not None:
            self._validate_image_features(tensor)
        elif self.image_feature_scales is not None:
            raise ValueError("UniGenBatch.image_feature_scales is set but image_features is None")
        if self.text_ids is not None:
            ti = tensor("text_ids", 2, ints)
            tm = tensor("text_mask", 2, (torch.bool, torch.int64, torch.int32, torch.uint8))
            if tm.shape != ti.shape:
                raise ValueError(f"UniGenBatch.text_mask shape {tuple(tm.shape)} != text_ids "
                                 f"shape {tuple(ti.shape)}")
            if max_text_length is not None and ti.shape[1] > max_text_length:
                raise ValueError(f"UniGenBatch.text_ids has {ti.shape[1]} tokens per row, more "
                                 f"than text.max_length = {max_text_length}")
            if text_vocab_size is not None and ti.numel() and (
                    int(ti.min()) < 0 or int(ti.max()) >= text_vocab_size):
                raise ValueError(f"UniGenBatch.text_ids must be in [0, {text_vocab_size}), got "
                                 f"values in [{int(ti.min())}, {int(ti.max())}]")
            lengths = tm.bool().sum(1)
            if ti.shape[0] and bool((lengths < 1).any()):
                raise ValueError("UniGenBatch.text_mask: every text needs at least one token")
            if ti.shape[0] and not bool((tm.bool() == (torch.arange(tm.shape[1], device=tm.device)
                                                        < lengths[:, None])).all()):
                raise ValueError("UniGenBatch.text_mask must be right-padded (ones, then zeros)")
        elif self.text_mask is not None:
            raise ValueError("UniGenBatch.text_mask is set but text_ids is None")

        n_img, n_txt = self.num_images, self.num_texts
        for name, n in (("image_index", n_img), ("text_index", n_txt)):
            v = getattr(self, name)
            if S and (int(v.min()) < -1 or int(v.max()) >= n):
                raise ValueError(f"UniGenBatch.{name} must be in [-1, {n}) (-1 = none), got values "
                                 f"in [{int(v.min())}, {int(v.max())}]")
        if S:
            has_img, has_txt = self.image_index >= 0, self.text_index >= 0
            need = {  # which inputs each task reads (module docstring)
                "trans": (False, True), "cap": (True, False), "qus": (True, True),
                "match": (True, True)}
            for t, (want_img, want_txt) in need.items():
                sel = task == TASK_IDS[t]
                if not bool(sel.any()):
                    continue
                if bool((has_img[sel] != want_img).any()) or bool((has_txt[sel] != want_txt).any()):
                    raise ValueError(
                        f"UniGenBatch: {t} samples must have "
                        f"{'an' if want_img else 'no'} image and {'a' if want_txt else 'no'} text "
                        f"(image_index / text_index = -1 means none)")

        if self.second_image_index is not None:
            second = tensor("second_image_index", 1, ints)
            if second.numel() != S:
                raise ValueError(f"UniGenBatch.second_image_index has {second.numel()} entries, "
                                 f"task has {S}")
            if S and (int(second.min()) < -1 or int(second.max()) >= n_img):
                raise ValueError(f"UniGenBatch.second_image_index must be in [-1, {n_img}) "
                                 f"(-1 = none), got values in [{int(second.min())}, "
                                 f"{int(second.max())}]")
            if S and bool(((second >= 0) & (self.image_index < 0)).any()):
                raise ValueError("UniGenBatch: a sample with a second image needs a first one")

        P = tensor("pair_image_index", 1, ints).numel()
        for name in ("pair_text_index", "pair_ids"):
            if tensor(name, 1, ints).numel() != P:
                raise ValueError(f"UniGenBatch.{name} has {getattr(self, name).numel()} entries, "
                                 f"pair_image_index has {P}")
        if P:
            for name, n in (("pair_image_index", n_img), ("pair_text_index", n_txt)):
                v = getattr(self, name)
                if int(v.min()) < 0 or int(v.max()) >= n:
                    raise ValueError(f"UniGenBatch.{name} must be in [0, {n}), got values in "
                                     f"[{int(v.min())}, {int(v.max())}]")

    def _validate_image_features(self, tensor) -> None:
        from unigen.model.vit_features import FEATURE_DTYPES

        if self.images is not None:
            raise ValueError("UniGenBatch: images and image_features exclude each other (pixels "
                             "for the ViT, or its stored output)")
        feats = tensor("image_features", 3, tuple(FEATURE_DTYPES.values()))
        fp8 = feats.dtype == FEATURE_DTYPES["fp8"]
        if fp8 != (self.image_feature_scales is not None):
            raise ValueError("UniGenBatch.image_feature_scales must be given for fp8 "
                             "image_features, and only for them")
        if fp8 and tuple(tensor("image_feature_scales", 1, (torch.float32,)).shape) != (
                feats.shape[0],):
            raise ValueError(f"UniGenBatch.image_feature_scales must be [{feats.shape[0]}] (one "
                             f"per image), got {tuple(self.image_feature_scales.shape)}")
        _check_finite("image_features", feats)
        if fp8:
            scales = self.image_feature_scales
            if scales.numel() and not bool((torch.isfinite(scales) & (scales > 0)).all()):
                raise ValueError("UniGenBatch.image_feature_scales must be finite and > 0")


def _check_finite(name: str, x: torch.Tensor) -> None:
    """The model's ops run without their own finiteness checks (unigen.model.losses), so the
    batch's float inputs are checked here. float8 e4m3fn has no inf and one NaN code per sign
    (all exponent and mantissa bits set): read on the bits, no float copy of the features."""
    if not x.numel():
        return
    if x.dtype == torch.float8_e4m3fn:
        bad = bool(((x.view(torch.uint8) & 0x7F) == 0x7F).any())
    else:
        bad = not bool(torch.isfinite(x).all())
    if bad:
        raise ValueError(f"UniGenBatch.{name} contains non-finite values (nan or inf)")
