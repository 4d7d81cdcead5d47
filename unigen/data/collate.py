"""Batching: token ids packed for varlen attention, images decoded in one batched call.

The trainer builds the model batch from these pieces; nothing here knows the model.
:func:`pack_token_ids` gives both layouts of a list of sequences — padded ``[B, L]`` and packed
``[total]`` with ``cu_seqlens`` (the layout of ``prefix_lm_attention``).
:func:`collate_task_batch` groups a mixed list of tokenised samples by task.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_token_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> dict:
    """``{"input_ids" [B, L], "attention_mask" [B, L], "lengths" [B], "packed_ids" [T],
    "cu_seqlens" [B+1] int32, "max_seqlen" int}`` (``L`` = longest, ``T`` = total tokens)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    batch, width = len(seqs), int(lengths.max()) if len(seqs) else 0
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = True
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    packed = torch.cat([torch.as_tensor(list(s), dtype=torch.long) for s in seqs]) if batch \
        else torch.zeros(0, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "lengths": lengths, "packed_ids": packed,
            "cu_seqlens": cu, "max_seqlen": width}


def collate_task_batch(samples: Sequence[dict], *, encoder_pad_id: int, decoder_pad_id: int,
                       image_decoder=None) -> dict:
    """Tokenised samples (any mix of tasks) → ``{task: group}``.

    Each group: ``"encoder"`` and ``"target"`` (:func:`pack_token_ids` dicts; no ``"encoder"``
    for ``cap``), ``"images"`` ``[n, 3, H, W]`` for the image tasks, and the per-sample lists
    ``"key"`` and ``"lang"``. Encoded images are decoded with ``image_decoder.decode`` (DALI or
    PIL); a sample whose image fails to decode is dropped from its group, and the number
    dropped is reported under ``"dropped"``, where their images were (:func:`image_origin`)
    under ``"dropped_samples"``. With ``image_decoder=None`` encoded images stay
    a list of bytes (for DALI on the GPU, which belongs in the main process, not in DataLoader
    workers): :func:`decode_batch_images` finishes the job there. Inside a
    :class:`~unigen.data.mixing.MixedTaskDataset` the batch also gets ``"data_state"``.
    """
    if not samples:
        raise ValueError("collate_task_batch needs at least one sample")
    by_task: dict[str, list[dict]] = {}
    for s in samples:
        for k in ("task", "encoder_ids", "target_ids"):
            if k not in s:
                raise KeyError(f"sample from {s.get('origin', '?')} has no {k!r}; "
                               f"tokenise samples (TaskTokenizer) before collating")
        by_task.setdefault(s["task"], []).append(s)
    out: dict = {"dropped": 0, "dropped_samples": []}
    for task, group in by_task.items():
        if "image" in group[0]:
            raw = [s["image"] for s in group]
            if isinstance(raw[0], torch.Tensor):
                images, ok = torch.stack(raw), list(range(len(raw)))
            elif image_decoder is None:
                # left encoded: decode_batch_images() runs DALI in the main process later
                images, ok = list(raw), list(range(len(raw)))
            else:
                images, ok = image_decoder.decode(raw)
            _record_dropped(out, [image_origin(s) for s in group], ok)
            group = [group[i] for i in ok]
            if not group:
                continue
        else:
            images = None
        entry = {"target": pack_token_ids([s["target_ids"] for s in group], decoder_pad_id),
                 "key": [s.get("key") for s in group],
                 "lang": [s.get("lang", "en") for s in group]}
        if task != "cap":
            entry["encoder"] = pack_token_ids([s["encoder_ids"] for s in group], encoder_pad_id)
        if images is not None:
            entry["images"] = images
            entry["origin"] = [image_origin(s) for s in group]
        out[task] = entry
    return out


def image_origin(sample: dict) -> str:
    """Where a sample's image comes from: ``"<shard>[<key>]"`` (from the image store for CC6L
    and QA samples; the captioning sample's own location names the shard and key)."""
    return sample.get("image_origin") or sample.get("origin") or f"key {sample.get('key')!r}"


def _record_dropped(batch: dict, origins: list[str], ok: Sequence[int]) -> None:
    kept = set(ok)
    lost = [o for i, o in enumerate(origins) if i not in kept]
    batch["dropped"] += len(lost)
    batch.setdefault("dropped_samples", []).extend(lost)


def _select(packed: dict, keep: list[int], pad_id: int) -> dict:
    return pack_token_ids([packed["packed_ids"][packed["cu_seqlens"][i]:
                                                packed["cu_seqlens"][i + 1]].tolist()
                           for i in keep], pad_id)


def decode_batch_images(batch: dict, image_decoder, *, encoder_pad_id: int,
                        decoder_pad_id: int) -> dict:
    """Decode the images a worker left encoded (see :func:`collate_task_batch`), in place."""
    for task, entry in list(batch.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
            continue
        images, ok = image_decoder.decode(entry["images"])
        n = len(entry["images"])
        origins = entry.get("origin") or [f"key {k!r}" for k in entry["key"]]
        _record_dropped(batch, origins, ok)
        if not ok:
            del batch[task]
            continue
        entry["images"] = images
        if len(ok) < n:
            entry["target"] = _select(entry["target"], ok, decoder_pad_id)
            if "encoder" in entry:
                entry["encoder"] = _select(entry["encoder"], ok, encoder_pad_id)
            for name in ("key", "lang", "origin"):
                if name in entry:
                    entry[name] = [entry[name][i] for i in ok]
    return batch
