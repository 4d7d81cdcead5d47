"""Scores of a UniGen model on IGLUE files (paper §4.3.2): accuracy of the generated keyword
or answer for XVNLI, xGQA and MaRVL, Recall@1 for xFlickr&CO and WIT.

A generated answer is right when it equals the reference after :func:`normalize_answer`
(lower case, no punctuation or articles): ``accuracy``, the headline. The paper adjudicated near
misses ("black cat" for "cat") by hand; ``relaxed_accuracy`` reports them by rule
(:func:`~unigen.scoring.qa.relaxed_match`: the reference's words inside the prediction), beside
the headline, never in its place. For the keyword tasks the share of outputs that are no keyword
at all is ``not_a_label``; ``decode="rank"`` instead picks the candidate of highest
log-probability among the keywords or, for xGQA, IGLUE's closed answer set.

Retrieval ranks every test image against every test caption (an empty caption is a query too)
by contrastive similarity, then re-ranks the contrastive top-k by the [match] probability. As
IGLUE (volta's ``eval_retrieval.py``) and Table 1 report it: IR = text→image R@1 over the
captions, TR = image→text R@1 over the images (a hit is any of the image's captions), each
re-ranked (``ir_r1``, ``tr_r1``; the paper's parenthesised dual-stream numbers are the
contrastive ``ir_r1_contrastive``, ``tr_r1_contrastive``), and ``r1`` their mean.

Long evaluations print progress: examples or images per second and the time left. The metrics
hold no timings (scores of the same model on the same file are equal); ``python -m
unigen.evaluate`` adds the seconds per file.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from unigen.scoring.qa import normalize_answer, relaxed_match
from unigen.scoring.retrieval import recall_at_1

from .config import check_decode
from .images import ImageResolver, RecordImages
from .readers import MARVL_WORDS, RETRIEVAL_TASKS, XVNLI_WORDS, IGLUEFile

_LABEL_WORDS = {"xvnli": set(XVNLI_WORDS.values()), "marvl": set(MARVL_WORDS.values())}


class Progress:
    """``done/total`` lines with items (and images) per second and the time left, every 10% of
    the work and at the end; ``images_per_item`` is 2 for MaRVL's image pairs."""

    def __init__(self, total: int, what: str, log: Callable[[str], None] | None,
                 images_per_item: int = 0):
        self.total, self.what, self.log = total, what, log
        self.images_per_item = images_per_item
        self.t0, self.next = time.perf_counter(), 0.1

    def rate(self, done: int) -> float:
        return done / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, done: int, extra: str = "") -> None:
        if self.log is None or not (done / self.total >= self.next or done == self.total):
            return
        elapsed, rate = time.perf_counter() - self.t0, self.rate(done)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        images = (f" = {rate * self.images_per_item:.1f} images/s" if self.images_per_item
                  else "")
        self.log(f"  {done}/{self.total} {self.what} ({elapsed:.0f} s, {rate:.1f} "
                 f"{self.what}/s{images}, ETA {eta:.0f} s){extra}")
        self.next = done / self.total + 0.1


def _image_batches(file: IGLUEFile, resolver: ImageResolver, image_size: int, batch_size: int,
                   workers: int, pair_images: str = "side_by_side"):
    data = RecordImages(file.records, resolver, image_size, file.path,  # resolves every image
                        pair_images)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers)
    start = 0
    for images in loader:
        yield start, images
        start += images.shape[0]


@torch.no_grad()
def evaluate_generative(model, file: IGLUEFile, resolver: ImageResolver, *, batch_size: int = 64,
                        max_new_tokens: int = 8, num_beams: int = 1, workers: int = 0,
                        decode: str = "generate", answer_set: list[str] | None = None,
                        pair_images: str = "side_by_side",
                        log: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """Accuracy on an XVNLI / xGQA / MaRVL file, and every prediction.

    decode: "generate" (``model.answer``, the paper's protocol) or "rank": the candidate of
    highest log-probability (:meth:`UniGen.score_answers`) among the keywords (xvnli, marvl)
    or ``answer_set`` (xgqa: IGLUE's closed answer set, :func:`read_answer_set`).
    pair_images: MaRVL's two images "side_by_side" (one image) or "two_prefixes".
    """
    check_decode(file.task, decode, "evaluate", "answer_set" if answer_set else "")
    labels = _LABEL_WORDS.get(file.task)
    choices = sorted(labels) if labels is not None else answer_set
    predictions, hits, relaxed, off_label = [], 0, 0, 0
    n = len(file.records)
    progress = Progress(n, "examples", log, images_per_item=len(file.records[0].images))
    for start, images in _image_batches(file, resolver, model.config.vision.image_size,
                                        batch_size, workers, pair_images):
        recs = file.records[start:start + images.shape[0]]
        texts = [r.texts[0] for r in recs]
        second = None
        if images.dim() == 5:  # two prefixes: [B, 2, 3, S, S]
            images, second = images[:, 0], images[:, 1]
        if decode == "rank":
            best = model.score_answers(images, texts, choices,
                                       second_images=second).argmax(dim=1).tolist()
            outs = [choices[b] for b in best]
        else:
            outs = model.answer(images, texts, max_new_tokens=max_new_tokens,
                                num_beams=num_beams, second_images=second)
        for rec, out in zip(recs, outs):
            pred, gold = normalize_answer(out), normalize_answer(rec.answer)
            hits += pred == gold
            near = relaxed_match(out, rec.answer)
            relaxed += near
            off_label += labels is not None and pred not in labels
            predictions.append({"uid": rec.uid, "prediction": out, "answer": rec.answer,
                                "correct": pred == gold, "relaxed_correct": near})
        done = start + len(recs)
        progress.update(done, f", accuracy so far {hits / done:.1%}")
    metrics = {"n": n, "skipped": file.skipped, "accuracy": hits / n,
               "relaxed_accuracy": relaxed / n}
    if labels is not None:
        metrics["not_a_label"] = off_label / n
    if answer_set is not None:
        known = {normalize_answer(a) for a in answer_set}
        # Ranking can never be right on these: said, not hidden in the accuracy.
        metrics["answer_not_in_set"] = sum(normalize_answer(r.answer) not in known
                                           for r in file.records) / n
    return metrics, predictions


def retrieval_metrics(result, owner: torch.Tensor, n_images: int) -> dict:
    """IGLUE's retrieval scores of a :class:`~unigen.model.unigen_model.RetrievalResult` over
    ``n_images`` images and the captions ``owner`` assigns to them (caption j describes image
    ``owner[j]``)."""
    correct = torch.arange(n_images)[:, None] == owner[None, :]
    s = recall_at_1(result, correct)
    return {"images": n_images, "texts": int(owner.numel()),
            "ir_r1": s.t2i_rerank, "tr_r1": s.i2t_rerank,
            "r1": (s.i2t_rerank + s.t2i_rerank) / 2,
            "ir_r1_contrastive": s.t2i_contrastive, "tr_r1_contrastive": s.i2t_contrastive,
            "r1_contrastive": (s.i2t_contrastive + s.t2i_contrastive) / 2,
            "ir_chance": s.t2i_chance, "tr_chance": s.i2t_chance}


def retrieval_predictions(result, file: IGLUEFile) -> list[dict]:
    """One line per query of a retrieval file: every caption's ranked images (IR) and every
    image's ranked captions (TR), the [match]-re-ranked top-k best first, with whether the
    first is right (any of the image's captions is)."""
    texts = [(r, t) for r, rec in enumerate(file.records) for t in rec.texts]
    out = []
    for j, (r, text) in enumerate(texts):
        top = result.text_to_image[j].tolist()
        out.append({"query": "text", "text": text, "image": file.records[r].uid,
                    "ranked": [file.records[i].uid for i in top], "correct": top[0] == r})
    for i, rec in enumerate(file.records):
        top = result.image_to_text[i].tolist()
        out.append({"query": "image", "image": rec.uid, "ranked": [texts[j][1] for j in top],
                    "correct": texts[top[0]][0] == i})
    return out


@torch.no_grad()
def evaluate_retrieval(model, file: IGLUEFile, resolver: ImageResolver, *, k: int = 16,
                       batch_size: int = 64, workers: int = 0,
                       log: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """IR and TR R@1 over an xFlickr&CO or WIT file (all its images × all its captions), and
    every query's ranking (:func:`retrieval_predictions`)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"evaluate_retrieval: k must be a positive int, got {k!r}")
    texts = [t for rec in file.records for t in rec.texts]
    if len(texts) < 2 or len(file.records) < 2:
        raise ValueError(f"evaluate_retrieval: {file.path} has {len(file.records)} images and "
                         f"{len(texts)} captions; retrieval needs at least 2 of each")
    progress = Progress(len(file.records), "images", log)
    parts = []
    for start, im in _image_batches(file, resolver, model.config.vision.image_size,
                                    batch_size, workers):
        parts.append(im)
        progress.update(start + im.shape[0])
    images = torch.cat(parts)
    owner = torch.tensor([i for i, rec in enumerate(file.records) for _ in rec.texts])
    kk = min(k, len(texts), len(file.records))
    t0 = time.perf_counter()
    if log is not None:
        log(f"  ranking {len(file.records)} images × {len(texts)} captions, the top {kk} of "
            f"each query re-ranked by [match] ({(len(file.records) + len(texts)) * kk} pairs)")
    result = model.retrieve(images, texts, k=kk, batch_size=batch_size)
    if log is not None:
        log(f"  ranked in {time.perf_counter() - t0:.0f} s")
    metrics = retrieval_metrics(result, owner, len(file.records))
    metrics.update(empty_texts=file.empty_texts, k=kk)
    return metrics, retrieval_predictions(result, file)


def evaluate_file(model, file: IGLUEFile, resolver: ImageResolver, *, batch_size: int = 64,
                  max_new_tokens: int = 8, num_beams: int = 1, k: int = 16, workers: int = 0,
                  decode: str = "generate", answer_set: list[str] | None = None,
                  pair_images: str = "side_by_side",
                  log: Callable[[str], None] | None = None) -> tuple[dict, list[dict]]:
    """The task's metrics on one file, and its predictions: the generated (or ranked) answer
    per example, or for retrieval each query's ranking."""
    if file.task in RETRIEVAL_TASKS:
        return evaluate_retrieval(model, file, resolver, k=k, batch_size=batch_size,
                                  workers=workers, log=log)
    return evaluate_generative(model, file, resolver, batch_size=batch_size,
                               max_new_tokens=max_new_tokens, num_beams=num_beams,
                               workers=workers, decode=decode, answer_set=answer_set,
                               pair_images=pair_images, log=log)


def headline(task: str, metrics: dict) -> float:
    """The number IGLUE ranks by for ``task``: accuracy, or the mean of IR and TR R@1."""
    return metrics["r1"] if task in RETRIEVAL_TASKS else metrics["accuracy"]
