"""From the pre-training pipeline's task groups to the model's :class:`UniGenBatch`.

The task streams yield sample dicts; :func:`~unigen.data.collate.collate_task_batch` groups a
batch of them by task (``{task: group}``); :func:`batch_from_task_groups` packs the groups into
the :class:`~unigen.model.batch.UniGenBatch` the model takes. The loader of
:func:`build_training_dataset` runs this in its workers and yields one :class:`LoaderBatch` per
batch: the model batch, how many samples it holds, and the data position after it (what makes
exact resuming possible, :class:`~unigen.data.mixing.DataPosition`).

With DALI the workers leave images encoded (DALI decodes in the main process, on the GPU when
there is one): the :class:`LoaderBatch` then holds the task groups, and :func:`finish_batch`
decodes and packs them in the trainer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from unigen.model.batch import UniGenBatch
from unigen.model.config import TASK_IDS, TASK_NAMES
from unigen.model.vit_features import ImageFeatures

from .build import build_mixed_dataset
from .collate import decode_batch_images
from .config import DataConfig
from .mixing import MixedTaskDataset
from .task_tokenizer import TaskTokenizer


def batch_from_task_groups(groups: dict, *, encoder_pad_id: int = 1) -> UniGenBatch:
    """Build a batch from :func:`unigen.data.collate.collate_task_batch`'s output.

    ``groups`` maps a task name to ``{"target": packed ids, "encoder": packed ids (not for
    cap), "images": [n, 3, H, W] or the stored ViT features of a feature-store run
    (:class:`~unigen.model.vit_features.ImageFeatures`; image tasks), "key": [...]}`` (other
    entries, e.g.
    "dropped" or "data_state", are ignored). trans/cap/qus groups become generative samples.
    The "match" group's (image, text) pairs become the pairs of L_CL and of the [match]
    task, whose "yes"/"no" samples the model builds itself (positives + mined negatives), so
    that group's targets are not used; pairs with the same "key" are positives of each other.
    """
    if not isinstance(groups, dict):
        raise TypeError(f"batch_from_task_groups: groups must be a dict, got "
                        f"{type(groups).__name__}")
    # "data_state" (resume position) and "dropped" (skip counts) ride along in collated
    # batches; they are metadata, not tasks.
    unknown = [t for t, g in groups.items()
               if isinstance(g, dict) and t not in TASK_IDS and t not in ("data_state", "dropped")]
    if unknown:
        raise ValueError(f"batch_from_task_groups: unknown tasks {unknown}; expected {TASK_NAMES}")
    images, texts, masks = [], [], []
    n_img = n_txt = 0
    task, img_idx, txt_idx, targets, target_lens = [], [], [], [], []
    pair_img, pair_txt, pair_keys = [], [], []

    def take_images(g, t):
        nonlocal n_img
        im = g.get("images")
        if not isinstance(im, (torch.Tensor, ImageFeatures)):
            raise ValueError(f"batch_from_task_groups: the {t} group needs decoded "
                             f"images ([n, 3, H, W] tensor; call decode_batch_images first) "
                             f"or stored ViT features")
        if images and type(im) is not type(images[0]):
            raise ValueError("batch_from_task_groups: a batch holds pixels or stored ViT "
                             "features, not both")
        images.append(im)
        n_img += len(im)
        return list(range(n_img - len(im), n_img))

    def take_texts(g, t):
        nonlocal n_txt
        enc = g.get("encoder")
        if enc is None:
            raise ValueError(f"batch_from_task_groups: the {t} group has no encoder ids")
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
            raise ValueError(f"batch_from_task_groups: the {t} group has {n} targets but "
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
    stored = ImageFeatures.cat(images) if images and isinstance(images[0], ImageFeatures) \
        else None
    return UniGenBatch(
        task=torch.tensor(task, dtype=torch.long),
        image_index=torch.tensor(img_idx, dtype=torch.long),
        text_index=torch.tensor(txt_idx, dtype=torch.long),
        target_ids=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long),
        target_cu_seqlens=cu,
        images=torch.cat(images) if images and stored is None else None,
        image_features=None if stored is None else stored.values,
        image_feature_scales=None if stored is None else stored.scales,
        text_ids=text_ids, text_mask=text_mask,
        pair_image_index=torch.tensor(pair_img, dtype=torch.long),
        pair_text_index=torch.tensor(pair_txt, dtype=torch.long),
        pair_ids=torch.tensor([key_ids.setdefault(k, len(key_ids)) for k in pair_keys],
                              dtype=torch.long))


@dataclass
class LoaderBatch:
    """One batch as the pre-training loader yields it (this rank's share of a step)."""

    num_samples: int
    """Samples drawn for the batch, less those dropped (an image that failed to decode); the
    mined [match] samples the model adds are not counted."""
    dropped: int = 0
    """Samples dropped from the batch."""
    dropped_samples: list[str] = dataclasses.field(default_factory=list)
    """Where the dropped samples' images are, ``"<shard>[<key>]"`` each (for the run's log)."""
    batch: UniGenBatch | None = None
    """The packed model batch (images decoded in the loader workers), or None while ``groups``
    still holds encoded images."""
    groups: dict | None = None
    """Task groups whose images are still encoded (DALI): :func:`finish_batch` decodes them."""
    data_state: dict | None = None
    """The loader worker's stream positions after this batch (set by MixedTaskDataset)."""

    def pin_memory(self) -> "LoaderBatch":
        # DataLoader(pin_memory=True) calls this on the main process's pinning thread.
        if self.batch is None:
            return self
        return dataclasses.replace(self, batch=self.batch.pin_memory())


def _task_groups(groups: dict) -> dict:
    # only the task entries: "dropped" and "data_state" are bookkeeping, not tasks
    return {t: g for t, g in groups.items() if t in TASK_NAMES and isinstance(g, dict)}


def _has_encoded_images(groups: dict) -> bool:
    return any(isinstance(g.get("images"), list) for g in _task_groups(groups).values())


class UniGenCollate:
    """``collate`` of :class:`MixedTaskDataset`: tokenised samples → a :class:`LoaderBatch`
    holding the :class:`UniGenBatch`, or the task groups while the images are still encoded
    (DALI backend; :func:`finish_batch` completes it). Picklable, so it ships to DataLoader
    workers."""

    def __init__(self, task_collate: Callable[[list[dict]], dict], *, encoder_pad_id: int):
        self.task_collate = task_collate
        self.encoder_pad_id = int(encoder_pad_id)

    def __call__(self, samples: list[dict]) -> LoaderBatch:
        groups = self.task_collate(samples)
        dropped = int(groups.get("dropped", 0))
        item = LoaderBatch(num_samples=len(samples) - dropped, dropped=dropped,
                           dropped_samples=list(groups.get("dropped_samples", [])))
        if _has_encoded_images(groups):
            item.groups = groups
        else:
            item.batch = batch_from_task_groups(_task_groups(groups),
                                                encoder_pad_id=self.encoder_pad_id)
        return item


def finish_batch(item: LoaderBatch, *, image_decoder=None, encoder_pad_id: int = 1,
                 decoder_pad_id: int = 0) -> UniGenBatch:
    """The :class:`UniGenBatch` of one loader item, decoding the images left encoded first
    (``item.num_samples`` and ``item.dropped`` then count the samples that failed to decode)."""
    if not isinstance(item, LoaderBatch):
        raise TypeError(f"finish_batch: expected a LoaderBatch (build the dataset with "
                        f"build_training_dataset), got {type(item).__name__}")
    if item.batch is not None:
        return item.batch
    if item.groups is None:
        raise ValueError("finish_batch: the LoaderBatch holds neither a batch nor task groups")
    if image_decoder is None:
        raise ValueError("the batch's images are still encoded but no image decoder was given")
    before = int(item.groups.get("dropped", 0))
    seen = len(item.groups.get("dropped_samples", []))
    groups = decode_batch_images(item.groups, image_decoder, encoder_pad_id=encoder_pad_id,
                                 decoder_pad_id=decoder_pad_id)
    newly_dropped = int(groups.get("dropped", 0)) - before
    item.dropped += newly_dropped
    item.num_samples -= newly_dropped
    item.dropped_samples.extend(groups.get("dropped_samples", [])[seen:])
    item.batch = batch_from_task_groups(_task_groups(groups), encoder_pad_id=encoder_pad_id)
    item.groups = None
    return item.batch


def build_training_dataset(cfg: DataConfig, tokenizer: TaskTokenizer, *, rank: int,
                           world_size: int, feature_store=None) -> MixedTaskDataset:
    """The mixed-task dataset of :func:`unigen.data.build.build_mixed_dataset`, whose batches
    come out as :class:`LoaderBatch` es (see :class:`UniGenCollate`)."""
    dataset = build_mixed_dataset(cfg, tokenizer, rank=rank, world_size=world_size,
                                  feature_store=feature_store)
    dataset.collate = UniGenCollate(dataset.collate, encoder_pad_id=tokenizer.encoder_pad_id)
    return dataset
