"""Evaluation: image–text retrieval (contrastive and [match]-re-ranked) and QA accuracy."""

from .qa import normalize_answer, qa_accuracy
from .retrieval import RetrievalScores, retrieval_recall_at_1

__all__ = ["RetrievalScores", "retrieval_recall_at_1", "qa_accuracy", "normalize_answer"]
