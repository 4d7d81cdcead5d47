"""Scores of a trained model: image–text retrieval R@1 (contrastive and [match]-re-ranked), QA
accuracy, and the synthetic world's held-out split (the demo). IGLUE's task metrics build on
these in :mod:`unigen.iglue.scoring`."""

from .qa import normalize_answer, qa_accuracy, relaxed_match
from .retrieval import RetrievalScores, recall_at_1, retrieval_recall_at_1

__all__ = ["RetrievalScores", "normalize_answer", "qa_accuracy", "recall_at_1",
           "relaxed_match", "retrieval_recall_at_1"]
