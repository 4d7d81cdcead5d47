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
    n = len(texts)
    group = _groups(texts)
    same = group[:, None] == group[None, :]  # same[i, j]: text j is a correct answer for image i
    result = model.retrieve(images, texts, k=min(k, n))
    sim_top1_i2t = result.image_to_text_similarity.argmax(dim=1)
    i2t_c = result.image_to_text.gather(1, sim_top1_i2t[:, None]).squeeze(1)
    i2t_r = result.image_to_text[:, 0]
    sim_top1_t2i = result.text_to_image_similarity.argmax(dim=1)
    t2i_c = result.text_to_image.gather(1, sim_top1_t2i[:, None]).squeeze(1)
    t2i_r = result.text_to_image[:, 0]
    rows = torch.arange(n)
    hit = lambda top: same[rows, top.cpu()].float().mean().item()
    chance = same.float().sum(1).div(n).mean().item()  # symmetric: same is symmetric
    return RetrievalScores(i2t_contrastive=hit(i2t_c), t2i_contrastive=hit(t2i_c),
                           i2t_rerank=hit(i2t_r), t2i_rerank=hit(t2i_r),
                           i2t_chance=chance, t2i_chance=chance)
