"""Image→text and text→image Recall@1, by contrastive similarity alone and after [match]
re-ranking of the contrastive top-k (the two-stage retrieval of CCLM/BLIP, paper §4.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RetrievalScores:
    """Recall@1 in [0, 1] for one set of images and their texts (one language)."""

    i2t_contrastive: float
    t2i_contrastive: float
    i2t_rerank: float
    t2i_rerank: float
    i2t_chance: float  # expected R@1 of a random ranking
    t2i_chance: float


def _groups(texts):
    """Index of each text's equivalence class: identical strings describe the same scene, so
    retrieving any of them counts as a hit (a synthetic world repeats captions)."""
    ids = {}
    return torch.tensor([ids.setdefault(t, len(ids)) for t in texts])


def recall_at_1(result, correct: torch.Tensor) -> RetrievalScores:
    """Recall@1 of a :class:`~unigen.model.unigen_model.RetrievalResult` over ``N_img`` images
    and ``N_txt`` texts; ``correct[i, j]`` says that text j describes image i. The contrastive
    top-1 is the candidate of highest similarity, the re-ranked one the first of the list."""
    correct = correct.bool().cpu()

    def hits(top, sim, truth):
        by_sim = top.gather(1, sim.argmax(dim=1, keepdim=True)).squeeze(1).cpu()
        rows = torch.arange(truth.shape[0])
        return (truth[rows, by_sim].float().mean().item(),
                truth[rows, top[:, 0].cpu()].float().mean().item())

    i2t_c, i2t_r = hits(result.image_to_text, result.image_to_text_similarity, correct)
    t2i_c, t2i_r = hits(result.text_to_image, result.text_to_image_similarity, correct.t())
    return RetrievalScores(i2t_contrastive=i2t_c, t2i_contrastive=t2i_c, i2t_rerank=i2t_r,
                           t2i_rerank=t2i_r, i2t_chance=correct.float().mean(1).mean().item(),
                           t2i_chance=correct.float().mean(0).mean().item())


@torch.no_grad()
def retrieval_recall_at_1(model, images: torch.Tensor, texts: list[str], *, k: int = 8,
                          batch_size: int = 256) -> RetrievalScores:
    """``images[i]`` and ``texts[i]`` belong together; every image ranks all texts and every
    text all images. A hit is a top-1 whose text equals the query's own text (i2t) or whose
    image's text equals the query (t2i)."""
    if images.shape[0] != len(texts):
        raise ValueError(f"retrieval_recall_at_1: {images.shape[0]} images but {len(texts)} texts")
    if len(texts) < 2:
        raise ValueError("retrieval_recall_at_1: needs at least 2 image-text pairs")
    group = _groups(texts)
    same = group[:, None] == group[None, :]  # same[i, j]: text j is a correct answer for image i
    return recall_at_1(model.retrieve(images, texts, k=min(k, len(texts)), batch_size=batch_size),
                       same)
