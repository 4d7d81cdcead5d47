"""unigen.scoring: Recall@1 bookkeeping (duplicates, chance, re-ranking), QA normalisation, and the
synthetic-world evaluation end to end on an untrained tiny model."""

import pytest
import torch

from unigen.model.unigen_model import RetrievalResult
from unigen.scoring import normalize_answer, qa_accuracy, retrieval_recall_at_1


class FakeRetriever:
    """retrieve() from a fixed similarity matrix and fixed [match] scores."""

    def __init__(self, sim, match):
        self.sim, self.match = sim, match

    def retrieve(self, images, texts, k, batch_size=256):
        def rank(sim, match):
            top_sim, top = sim.topk(k, dim=1)
            score = match.gather(1, top)
            order = score.argsort(dim=1, descending=True)
            return top.gather(1, order), score.gather(1, order), top_sim.gather(1, order)

        return RetrievalResult(*rank(self.sim, self.match), *rank(self.sim.t(), self.match.t()))


def test_recall_at_1_contrastive_and_reranked():
    n = 4
    texts = ["a", "b", "c", "d"]
    sim = torch.eye(n)  # contrastive: every image finds its own text
    match = torch.eye(n).roll(1, dims=1)  # [match] prefers the next text
    # k = n: every candidate is re-ranked, so [match]'s preference decides the top-1
    r = retrieval_recall_at_1(FakeRetriever(sim, match), torch.zeros(n, 3, 2, 2), texts, k=n)
    assert r.i2t_contrastive == r.t2i_contrastive == 1.0
    assert r.i2t_rerank == 0.0 and r.t2i_rerank == 0.0
    assert r.i2t_chance == pytest.approx(1 / n)


def test_identical_captions_count_as_hits_and_raise_chance():
    texts = ["x", "x", "y", "z"]
    sim = torch.zeros(4, 4)
    sim[0, 1] = sim[1, 0] = sim[2, 2] = sim[3, 3] = 1.0  # images 0/1 retrieve each other's "x"
    r = retrieval_recall_at_1(FakeRetriever(sim, sim.clone()), torch.zeros(4, 3, 2, 2), texts, k=1)
    assert r.i2t_contrastive == 1.0 and r.t2i_contrastive == 1.0
    assert r.i2t_chance == pytest.approx((2 + 2 + 1 + 1) / 16)


def test_recall_bad_input():
    with pytest.raises(ValueError, match="2 images but 3 texts"):
        retrieval_recall_at_1(None, torch.zeros(2, 3, 2, 2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_recall_at_1(None, torch.zeros(1, 3, 2, 2), ["a"])


class FakeAnswerer:
    def __init__(self, answers):
        self.answers = answers

    def answer(self, images, questions, max_new_tokens):
        return [self.answers[q] for q in questions]


def test_qa_accuracy_normalises():
    assert normalize_answer(" The  Red, ") == "red"
    assert normalize_answer("at the top") == "at top" != normalize_answer("top")
    model = FakeAnswerer({"q1": "Red.", "q2": "at the top", "q3": "blue"})
    acc = qa_accuracy(model, torch.zeros(3, 3, 2, 2), ["q1", "q2", "q3"],
                      ["red", "At the top!", "green"])
    assert acc == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same number"):
        qa_accuracy(model, torch.zeros(2, 3, 2, 2), ["q1"], ["red"])


@pytest.mark.slow
def test_evaluate_world_end_to_end(tmp_path):
    from unigen.data.synthetic_world import all_texts, write_synthetic_world
    from unigen.model import UniGen
    from unigen.model.tokenizers import train_tiny_tokenizers
    from unigen.scoring.world import evaluate_world, load_eval_split

    world = write_synthetic_world(str(tmp_path / "w"), num_images=20, num_text_pairs=20,
                                  num_eval_images=12, image_size=32, max_objects=1)
    tok = train_tiny_tokenizers(all_texts(world), str(tmp_path / "tok"))
    model = UniGen.tiny(tokenizers=tok)
    split = load_eval_split(world, 32)
    assert split.images.shape == (12, 3, 32, 32)
    assert set(split.captions) == set(world.languages)
    scores = evaluate_world(model, split, world, k=3)
    assert [s.language for s in scores] == list(world.languages)
    for s in scores:
        for v in (s.i2t_contrastive, s.t2i_contrastive, s.i2t_rerank, s.t2i_rerank, s.qa_accuracy):
            assert 0.0 <= v <= 1.0
        assert s.with_images_in_training == (s.language not in world.text_only_languages)
