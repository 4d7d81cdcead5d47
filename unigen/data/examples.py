"""Training examples before tokenisation, and the collate that packs them into a
:class:`~unigen.model.batch.UniGenBatch` (tokenising the texts, preprocessing the images).

Fine-tuning and tests build batches this way; pre-training's streams go through task groups
instead (:mod:`unigen.data.batches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from unigen.model.batch import UniGenBatch
from unigen.model.config import TASK_IDS, TASK_NAMES
from unigen.model.image_encoder import preprocess_images
from unigen.model.vit_features import ImageFeatures


@dataclass
class Example:
    """One training example, before tokenisation (what a data pipeline yields per record).

    task:     "trans", "cap", "qus" or "match", or None for a pair used only by L_CL/[match].
    target:   the English target text (or decoder token ids; eos is appended when missing).
    image:    preprocessed float tensor [3, H, W] or a PIL image (cap, qus, match, pairs), or
              the image's stored ViT output (an ImageFeatures of one row: a feature-store run;
              every image of a batch is then stored features).
    text:     encoder input: the source sentence (trans), the question (qus), the text (match).
    image_id: any hashable identifying the image: examples with the same id share one row of
              `images` (encoded once) and their pairs are positives of each other.
    pair_text: when set, (image, pair_text) is an image-text pair for L_CL and the mined [match]
              (e.g. a caption, in any language, of the image of a cap example).
    second_image, second_image_id: a second image the sample reads after ``image`` (a qus or
              match example over an image pair: E_v(left) ⊕ E_v(right)), and its identity.
    """

    task: str | None
    target: str | Sequence[int] | None = None
    image: Any = None
    text: str | None = None
    image_id: Any = None
    pair_text: str | None = None
    second_image: Any = None
    second_image_id: Any = None


def collate_examples(examples: Sequence[Example], *, text_tokenizer, decoder_tokenizer,
                     image_size: int, image_mean=None, image_std=None,
                     max_text_length: int = 40) -> UniGenBatch:
    """Tokenise, deduplicate and pack ``examples`` into a :class:`UniGenBatch`.

    ``text_tokenizer`` is the XLM-R-style encoder tokenizer, ``decoder_tokenizer`` the GPT-2-style
    one (both HF tokenizers; see :mod:`unigen.model.tokenizers`). Images that are PIL images or uint8
    tensors are resized and CLIP-normalised; float tensors must already be preprocessed.
    """
    if len(examples) == 0:
        raise ValueError("collate_examples: examples is empty")
    eos = decoder_tokenizer.eos_token_id
    if eos is None:
        raise ValueError("collate_examples: decoder_tokenizer has no eos token")

    image_rows: dict[Any, int] = {}
    images: list = []
    text_rows: dict[str, int] = {}
    texts: list[str] = []

    def image_row(ex: Example, i: int, image=None, image_id=None) -> int:
        image, image_id = (ex.image, ex.image_id) if image is None else (image, image_id)
        if image is None:
            raise ValueError(f"collate_examples: example {i} ({ex.task}) needs an image")
        key = ("id", image_id) if image_id is not None else ("obj", id(image))
        if key not in image_rows:
            image_rows[key] = len(images)
            images.append(image)
        return image_rows[key]

    def text_row(text: str | None, i: int, what: str) -> int:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"collate_examples: example {i} needs a non-empty {what} string")
        if text not in text_rows:
            text_rows[text] = len(texts)
            texts.append(text)
        return text_rows[text]

    task, img_idx, txt_idx, targets, second_idx = [], [], [], [], []
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
            if ex.second_image is not None and ex.task not in ("qus", "match"):
                raise ValueError(f"collate_examples: example {i} ({ex.task}) cannot read a "
                                 f"second image (qus and match can)")
            second_idx.append(image_row(ex, i, ex.second_image, ex.second_image_id)
                              if ex.second_image is not None else -1)
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

    stored = _stored_features(images)
    images_t = preprocess_images(images, image_size=image_size, mean=image_mean,
                                 std=image_std) if images and stored is None else None
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
        image_features=None if stored is None else stored.values,
        image_feature_scales=None if stored is None else stored.scales,
        pair_image_index=torch.tensor(pair_img, dtype=torch.long),
        pair_text_index=torch.tensor(pair_txt, dtype=torch.long),
        pair_ids=torch.tensor(pair_ids, dtype=torch.long),
        second_image_index=(torch.tensor(second_idx, dtype=torch.long)
                            if any(r >= 0 for r in second_idx) else None),
    )
    batch.validate(image_size=image_size, max_text_length=max_text_length)
    return batch


def _stored_features(images: list) -> ImageFeatures | None:
    """The batch's stored ViT features when its images are :class:`ImageFeatures` (all of
    them: pixels and stored features do not mix in one batch), else None."""
    stored = [isinstance(im, ImageFeatures) for im in images]
    if not any(stored):
        return None
    if not all(stored):
        raise ValueError("collate_examples: a batch's images are all pixels or all stored ViT "
                         "features (ImageFeatures), not a mix")
    return ImageFeatures.cat(images)
