"""Scores of a UniGen model on IGLUE files (paper §4.3.2): accuracy of the generated keyword
or answer for XVNLI, xGQA and MaRVL, Recall@1 for xFlickr&CO.

A generated answer is right when it equals the reference after :func:`normalize_answer`
(lower case, no punctuation or articles). The paper adjudicated near misses ("black cat" for
"cat") by hand; here they count as wrong, and for the keyword tasks the share of outputs that
are no keyword at all is reported as ``not_a_label``; ``decode="rank"`` instead picks the
keyword of highest log-probability (never off-label). Retrieval ranks every test image against
every test caption: by contrastive similarity, and after re-ranking the contrastive top-k by
the [match] probability; IGLUE's R@1 is the mean of the two directions (``r1``, re-ranked).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from unigen.scoring.qa import normalize_answer
from unigen.scoring.retrieval import recall_at_1

from .config import check_decode
from .images import ImageResolver, RecordImages
from .readers import MARVL_WORDS, XVNLI_WORDS, IGLUEFile

_LABEL_WORDS = {"xvnli": set(XVNLI_WORDS.values()), "marvl": set(MARVL_WORDS.values())}

def _image_batches(file: IGLUEFile, resolver: ImageResolver, image_size: int, batch_size: int,
                   workers: int):
    loader = torch.utils.data.DataLoader(RecordImages(file.records, resolver, image_size),
                                         batch_size=batch_size, num_workers=workers)
    start = 0
    for images in loader:
        yield start, images
        start += images.shape[0]

@torch.no_grad()
def evaluate_generative(model, file: IGLUEFile, resolver: ImageResolver, *, batch_size: int = 64,
                        max_new_tokens: int = 8, num_beams: int = 1, workers: int = 0,
                        decode: str = "generate",
                        log: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """Accuracy on an XVNLI / xGQA / MaRVL file, and every prediction.

    decode: "generate" (``model.answer``, the paper's protocol) or, for the keyword tasks,
    "rank" (the keyword of highest log-probability, :meth:`UniGen.score_answers`).
    """
    check_decode(file.task, decode, "evaluate")
    labels = _LABEL_WORDS.get(file.task)
    choices = sorted(labels) if labels is not None else None
    predictions, hits, off_label = [], 0, 0
    n, t0, next_log = len(file.records), time.perf_counter(), 0.1
    for start, images in _image_batches(file, resolver, model.config.vision.image_size,
                                        batch_size, workers):
        recs = file.records[start:start + images.shape[0]]
        texts = [r.texts[0] for r in recs]
        if decode == "rank":
            best = model.score_answers(images, texts, choices).argmax(dim=1).tolist()
            outs = [choices[b] for b in best]
        else:
            outs = model.answer(images, texts, max_new_tokens=max_new_tokens,
                                num_beams=num_beams)
        for rec, out in zip(recs, outs):
            pred, gold = normalize_answer(out), normalize_answer(rec.answer)
            hits += pred == gold
            off_label += labels is not None and pred not in labels
            predictions.append({"uid": rec.uid, "prediction": out, "answer": rec.answer,
                                "correct": pred == gold})
        done = start + len(recs)
        if log is not None and (done / n >= next_log or done == n):
            log(f"  {done}/{n} ({time.perf_counter() - t0:.0f} s), accuracy so far "
                f"{hits / done:.1%}")
            next_log = done / n + 0.1
    metrics = {"n": n, "skipped": file.skipped, "accuracy": hits / n}
    if labels is not None:
        metrics["not_a_label"] = off_label / n
    return metrics, predictions

@torch.no_grad()
def evaluate_retrieval(model, file: IGLUEFile, resolver: ImageResolver, *, k: int = 16,
                       batch_size: int = 64, workers: int = 0) -> dict:
    """Image→text and text→image Recall@1 over an xFlickr&CO file (all its images × all its
    captions)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"evaluate_retrieval: k must be a positive int, got {k!r}")
    images = torch.cat([im for _, im in _image_batches(file, resolver,
                                                       model.config.vision.image_size,
                                                       batch_size, workers)])
    texts = [t for rec in file.records for t in rec.texts]
    owner = torch.tensor([i for i, rec in enumerate(file.records) for _ in rec.texts])
    if len(texts) < 2:
        raise ValueError(f"evaluate_retrieval: {file.path} has fewer than 2 captions")
    correct = torch.arange(len(file.records))[:, None] == owner[None, :]
    s = recall_at_1(model.retrieve(images, texts, k=min(k, len(texts)), batch_size=batch_size),
                    correct)
    return {"images": len(file.records), "texts": len(texts),
            "i2t_contrastive": s.i2t_contrastive, "t2i_contrastive": s.t2i_contrastive,
            "i2t_rerank": s.i2t_rerank, "t2i_rerank": s.t2i_rerank,
            "r1": (s.i2t_rerank + s.t2i_rerank) / 2,
            "r1_contrastive": (s.i2t_contrastive + s.t2i_contrastive) / 2,
            "i2t_chance": s.i2t_chance, "t2i_chance": s.t2i_chance}

def evaluate_file(model, file: IGLUEFile, resolver: ImageResolver, *, batch_size: int = 64,
                  max_new_tokens: int = 8, num_beams: int = 1, k: int = 16, workers: int = 0,
                  decode: str = "generate",
                  log: Callable[[str], None] | None = None) -> tuple[dict, list[dict] | None]:
    """The task's metrics on one file (and, for the generative tasks, the predictions)."""
    if file.task == "xflickrco":
        return evaluate_retrieval(model, file, resolver, k=k, batch_size=batch_size,
                                  workers=workers), None
    return evaluate_generative(model, file, resolver, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, num_beams=num_beams,
                               workers=workers, decode=decode, log=log)

def headline(task: str, metrics: dict) -> float:
    """The number IGLUE reports for ``task``: accuracy, or mean re-ranked R@1."""
    return metrics["r1"] if task == "xflickrco" else metrics["accuracy"]
