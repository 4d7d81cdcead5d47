"""Glue between the data pipeline and the model: mixed-task samples → :class:`UniGenBatch`.

The data pipeline (:mod:`unigen.data`) yields, per batch, ``{task: group}`` dicts from
:func:`unigen.data.collate.collate_task_batch`; the model eats a packed
:class:`~unigen.model.batch.UniGenBatch`. :class:`UniGenCollate` is the ``collate`` of the
:class:`~unigen.data.mixing.MixedTaskDataset`, so the conversion runs inside the DataLoader
workers and the trainer receives ``{"batch": UniGenBatch, "data_state": ..., ...}``;
``MixedTaskDataset`` adds ``"data_state"`` (the worker's stream positions) to the dict this
collate returns, which is what makes exact resuming possible (:class:`DataPosition`).

With DALI the workers leave images encoded (DALI decodes in the main process, on the GPU when
there is one), so the conversion is finished by :func:`to_model_batch` in the trainer.
"""

from __future__ import annotations

from collections.abc import Callable

from unigen.data.build import build_mixed_dataset
from unigen.data.collate import decode_batch_images
from unigen.data.config import DataConfig
from unigen.data.mixing import MixedTaskDataset
from unigen.data.task_tokenizer import TaskTokenizer
from unigen.model.batch import UniGenBatch
from unigen.model.config import TASK_NAMES as TASKS


def _task_groups(groups: dict) -> dict:
    # only the task entries: "dropped" and "data_state" are bookkeeping, not tasks
    return {t: g for t, g in groups.items() if t in TASKS and isinstance(g, dict)}


def _has_encoded_images(groups: dict) -> bool:
    return any(isinstance(g.get("images"), list) for g in _task_groups(groups).values())


class UniGenCollate:
    """``collate`` for :class:`MixedTaskDataset`: tokenised samples → ``{"batch": UniGenBatch,
    "num_samples": int, "dropped": int}``, or ``{"groups": ..., ...}`` when the images are
    still encoded (DALI backend; :func:`to_model_batch` finishes). Picklable, so it can be
    shipped to DataLoader workers."""

    def __init__(self, task_collate: Callable[[list[dict]], dict], *, encoder_pad_id: int):
        self.task_collate = task_collate
        self.encoder_pad_id = int(encoder_pad_id)

    def __call__(self, samples: list[dict]) -> dict:
        groups = self.task_collate(samples)
        dropped = int(groups.get("dropped", 0))
        out = {"num_samples": len(samples) - dropped, "dropped": dropped}
        if _has_encoded_images(groups):
            out["groups"] = groups
        else:
            out["batch"] = UniGenBatch.from_task_groups(_task_groups(groups),
                                                        encoder_pad_id=self.encoder_pad_id)
        return out


def to_model_batch(item: dict, *, image_decoder=None, encoder_pad_id: int = 1,
                   decoder_pad_id: int = 0) -> UniGenBatch:
    """The :class:`UniGenBatch` of one loader item (decoding images left encoded first)."""
    if "batch" in item:
        return item["batch"]
    if "groups" not in item:
        raise ValueError(f"loader item has neither 'batch' nor 'groups' (keys: {sorted(item)}); "
                         f"build the dataset with build_training_dataset")
    if image_decoder is None:
        raise ValueError("the batch's images are still encoded but no image decoder was given")
    groups = decode_batch_images(item["groups"], image_decoder, encoder_pad_id=encoder_pad_id,
                                 decoder_pad_id=decoder_pad_id)
    item["dropped"] = int(groups.get("dropped", 0))
    return UniGenBatch.from_task_groups(_task_groups(groups), encoder_pad_id=encoder_pad_id)


def build_training_dataset(cfg: DataConfig, tokenizer: TaskTokenizer, *, rank: int,
                           world_size: int) -> MixedTaskDataset:
    """The mixed-task dataset of :func:`unigen.data.build.build_mixed_dataset`, whose batches
    come out as :class:`UniGenBatch` (see :class:`UniGenCollate`)."""
    dataset = build_mixed_dataset(cfg, tokenizer, rank=rank, world_size=world_size)
    dataset.collate = UniGenCollate(dataset.collate, encoder_pad_id=tokenizer.encoder_pad_id)
    return dataset


def batch_input_tokens(batch: UniGenBatch, num_query_tokens: int) -> int:
    """Tokens the model reads besides the targets: every text's real tokens and the Q-Former
    queries of every image (for tokens/s and the MFU estimate)."""
    n = 0
    if batch.text_mask is not None:
        n += int(batch.text_mask.sum())
    return n + batch.num_images * num_query_tokens
