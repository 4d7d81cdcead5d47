"""The training batch UniGen consumes, and the collate function that builds it from examples.

One batch mixes every task of the paper (§3.3). It holds each distinct image and each distinct
encoder text once, and refers to them by index, so an image used by [cap], [qus], L_CL and
[match] is encoded by the ViT and the Q-Former once.

Layout (N_img images, N_txt encoder texts, S generative samples, P image-text pairs)::

    images           float [N_img, 3, H, W]   CLIP-normalised pixels (H = W = vision.image_size),
                                              or None when no sample uses an image
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
from typing import Any, Sequence

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
        return 0 if self.images is None else int(self.images.shape[0])

    @property
    def num_texts(self) -> int:
        return 0 if self.text_ids is None else int(self.text_ids.shape[0])

    def target_lengths(self) -> torch.Tensor:
        return (self.target_cu_seqlens[1:] - self.target_cu_seqlens[:-1]).long()

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

    # ---- from the data pipeline -------------------------------------------------------------
    @classmethod
    def from_task_groups(cls, groups: dict, *, encoder_pad_id: int = 1) -> "UniGenBatch":
        """Build a batch from :func:`unigen.data.collate.collate_task_batch`'s output.

        ``groups`` maps a task name to ``{"target": packed ids, "encoder": packed ids (not for
        cap), "images": [n, 3, H, W] (image tasks), "key": [...]}`` (other entries, e.g.
        "dropped" or "data_state", are ignored). trans/cap/qus groups become generative samples.
        The "match" group's (image, text) pairs become the pairs of L_CL and of the [match]
        task, whose "yes"/"no" samples the model builds itself (positives + mined negatives), so
        that group's targets are not used; pairs with the same "key" are positives of each other.
        """
        if not isinstance(groups, dict):
            raise TypeError(f"UniGenBatch.from_task_groups: groups must be a dict, got "
                            f"{type(groups).__name__}")
        # "data_state" (resume position) and "dropped" (skip counts) ride along in collated
        # batches; they are metadata, not tasks.
        unknown = [t for t, g in groups.items()
                   if isinstance(g, dict) and t not in TASK_IDS and t not in ("data_state", "dropped")]
        if unknown:
            raise ValueError(f"UniGenBatch.from_task_groups: unknown tasks {unknown}; expected {TASK_NAMES}")
        images, texts, masks = [], [], []
        n_img = n_txt = 0
        task, img_idx, txt_idx, targets, target_lens = [], [], [], [], []
        pair_img, pair_txt, pair_keys = [], [], []

        def take_images(g, t):
            nonlocal n_img
            im = g.get("images")
            if not isinstance(im, torch.Tensor):
                raise ValueError(f"UniGenBatch.from_task_groups: the {t} group needs decoded "
                                 f"images ([n, 3, H, W] tensor; call decode_batch_images first)")
            images.append(im)
            n_img += im.shape[0]
            return list(range(n_img - im.shape[0], n_img))

        def take_texts(g, t):
            nonlocal n_txt
            enc = g.get("encoder")
            if enc is None:
                raise ValueError(f"UniGenBatch.from_task_groups: the {t} group has no encoder ids")
            texts.append(enc["input_ids"])
            masks.append(enc["attention_mask"].bool())
            n = enc["input_ids"].shape[0]
            n_txt += n
            return list(range(n_txt - n, n_txt))

        for t in TASK_NAMES:
            g = groups.get(t)
            if not isinstance(g, dict):
                continue
            n = int(g["target"]["lengths"].numel())
            if n == 0:
                continue
            rows_i = take_images(g, t) if t in ("cap", "qus", "match") else [-1] * n
            rows_t = take_texts(g, t) if t in ("trans", "qus", "match") else [-1] * n
            if len(rows_i) != n or len(rows_t) != n:
                raise ValueError(f"UniGenBatch.from_task_groups: the {t} group has {n} targets but "
                                 f"{len(rows_i)} images / {len(rows_t)} texts")
            if t == "match":
                pair_img += rows_i
                pair_txt += rows_t
                keys = g.get("key") or [None] * n
                pair_keys += [("key", k) if k is not None else ("row", r) for k, r in zip(keys, rows_i)]
                continue
            task += [TASK_IDS[t]] * n
            img_idx += rows_i
            txt_idx += rows_t
            targets.append(g["target"]["packed_ids"].long())
            target_lens.append(g["target"]["lengths"].long())

        text_ids = text_mask = None
        if texts:
            width = max(x.shape[1] for x in texts)
            text_ids = torch.cat([torch.nn.functional.pad(x.long(), (0, width - x.shape[1]),
                                                          value=encoder_pad_id) for x in texts])
            text_mask = torch.cat([torch.nn.functional.pad(m, (0, width - m.shape[1]),
                                                           value=False) for m in masks])
        lens = torch.cat(target_lens) if target_lens else torch.zeros(0, dtype=torch.long)
        cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
        key_ids: dict = {}
        return cls(
            task=torch.tensor(task, dtype=torch.long),
            image_index=torch.tensor(img_idx, dtype=torch.long),
            text_index=torch.tensor(txt_idx, dtype=torch.long),
            target_ids=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
            target_cu_seqlens=cu,
            images=torch.cat(images) if images else None,
            text_ids=text_ids, text_mask=text_mask,
            pair_image_index=torch.tensor(pair_img, dtype=torch.long),
            pair_text_index=torch.tensor(pair_txt, dtype=torch.long),
            pair_ids=torch.tensor([key_ids.setdefault(k, len(key_ids)) for k in pair_keys],
                                  dtype=torch.long))

    # ---- validation --------------------------------------------------------------------------
    def validate(self, *, image_size: int | None = None, max_text_length: int | None = None,
                 decoder_vocab_size: int | None = None) -> None:
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
        if self.text_ids is not None:
            ti = tensor("text_ids", 2, ints)
            tm = tensor("text_mask", 2, (torch.bool, torch.int64, torch.int32, torch.uint8))
            if tm.shape != ti.shape:
                raise ValueError(f"UniGenBatch.text_mask shape {tuple(tm.shape)} != text_ids "
                                 f"shape {tuple(ti.shape)}")
            if max_text_length is not None and ti.shape[1] > max_text_length:
                raise ValueError(f"UniGenBatch.text_ids has {ti.shape[1]} tokens per row, more "
                                 f"than text.max_length = {max_text_length}")
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


# ---- building batches from examples -----------------------------------------------------------
@dataclass
class Example:
    """One training example, before tokenisation (what a data pipeline yields per record).

    task:     "trans", "cap", "qus" or "match", or None for a pair used only by L_CL/[match].
    target:   the English target text (or decoder token ids; eos is appended when missing).
    image:    preprocessed float tensor [3, H, W] or a PIL image (cap, qus, match, pairs).
    text:     encoder input: the source sentence (trans), the question (qus), the text (match).
    image_id: any hashable identifying the image: examples with the same id share one row of
              `images` (encoded once) and their pairs are positives of each other.
    pair_text: when set, (image, pair_text) is an image-text pair for L_CL and the mined [match]
              (e.g. a caption, in any language, of the image of a cap example).
    """

    task: str | None
    target: str | Sequence[int] | None = None
    image: Any = None
    text: str | None = None
    image_id: Any = None
    pair_text: str | None = None


def collate_examples(examples: Sequence[Example], *, text_tokenizer, decoder_tokenizer,
                     image_size: int, image_mean=None, image_std=None,
                     max_text_length: int = 40) -> UniGenBatch:
    """Tokenise, deduplicate and pack ``examples`` into a :class:`UniGenBatch`.

    ``text_tokenizer`` is the XLM-R-style encoder tokenizer, ``decoder_tokenizer`` the GPT-2-style
    one (both HF tokenizers; see :mod:`unigen.model.tokenizers`). Images that are PIL images or uint8
    tensors are resized and CLIP-normalised; float tensors must already be preprocessed.
    """
    from unigen.model.image_encoder import preprocess_images

    if len(examples) == 0:
        raise ValueError("collate_examples: examples is empty")
    eos = decoder_tokenizer.eos_token_id
    if eos is None:
        raise ValueError("collate_examples: decoder_tokenizer has no eos token")

    image_rows: dict[Any, int] = {}
    images: list = []
    text_rows: dict[str, int] = {}
    texts: list[str] = []

    def image_row(ex: Example, i: int) -> int:
        if ex.image is None:
            raise ValueError(f"collate_examples: example {i} ({ex.task}) needs an image")
        key = ("id", ex.image_id) if ex.image_id is not None else ("obj", id(ex.image))
        if key not in image_rows:
            image_rows[key] = len(images)
            images.append(ex.image)
        return image_rows[key]

    def text_row(text: str | None, i: int, what: str) -> int:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"collate_examples: example {i} needs a non-empty {what} string")
        if text not in text_rows:
            text_rows[text] = len(texts)
            texts.append(text)
        return text_rows[text]

    task, img_idx, txt_idx, targets = [], [], [], []
    pair_img, pair_txt, pair_key = [], [], []
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise TypeError(f"collate_examples: examples[{i}] must be an Example, got "
                            f"{type(ex).__name__}")
        if ex.task is None and ex.pair_text is None:
            raise ValueError(f"collate_examples: example {i} has neither a task nor a pair_text")
        if ex.task is not None:
            if ex.task not in TASK_IDS:
                raise ValueError(f"collate_examples: example {i} has unknown task {ex.task!r}; "
                                 f"expected one of {TASK_NAMES}")
            uses_img = ex.task in ("cap", "qus", "match")
            uses_txt = ex.task in ("trans", "qus", "match")
            task.append(TASK_IDS[ex.task])
            img_idx.append(image_row(ex, i) if uses_img else -1)
            txt_idx.append(text_row(ex.text, i, "text") if uses_txt else -1)
            if ex.target is None:
                raise ValueError(f"collate_examples: example {i} ({ex.task}) has no target")
            if isinstance(ex.target, str):
                ids = decoder_tokenizer(ex.target, add_special_tokens=False)["input_ids"]
            else:
                ids = [int(t) for t in ex.target]
            if not ids or ids[-1] != eos:
                ids = list(ids) + [eos]
            targets.append(ids)
        if ex.pair_text is not None:
            r = image_row(ex, i)
            pair_img.append(r)
            pair_txt.append(text_row(ex.pair_text, i, "pair_text"))
            pair_key.append(("id", ex.image_id) if ex.image_id is not None else ("row", r))

    images_t = preprocess_images(images, image_size=image_size, mean=image_mean,
                                 std=image_std) if images else None
    text_ids = text_mask = None
    if texts:
        enc = text_tokenizer(texts, padding=True, truncation=True, max_length=max_text_length,
                             return_tensors="pt")
        text_ids = enc["input_ids"].long()
        text_mask = enc["attention_mask"].bool()
    lengths = [len(t) for t in targets]
    cu = torch.zeros(len(targets) + 1, dtype=torch.int32)
    if lengths:
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    key_ids: dict[Any, int] = {}
    pair_ids = [key_ids.setdefault(k, len(key_ids)) for k in pair_key]
    batch = UniGenBatch(
        task=torch.tensor(task, dtype=torch.long),
        image_index=torch.tensor(img_idx, dtype=torch.long),
        text_index=torch.tensor(txt_idx, dtype=torch.long),
        target_ids=torch.tensor([t for ids in targets for t in ids], dtype=torch.long),
        target_cu_seqlens=cu,
        images=images_t, text_ids=text_ids, text_mask=text_mask,
        pair_image_index=torch.tensor(pair_img, dtype=torch.long),
        pair_text_index=torch.tensor(pair_txt, dtype=torch.long),
        pair_ids=torch.tensor(pair_ids, dtype=torch.long),
    )
    batch.validate(image_size=image_size, max_text_length=max_text_length)
    return batch
