"""Evaluation: image–text retrieval (contrastive and [match]-re-ranked), QA accuracy, and the
IGLUE tasks' metrics."""

from .iglue import evaluate_file, evaluate_generative, evaluate_retrieval
from .qa import normalize_answer, qa_accuracy
from .retrieval import RetrievalScores, recall_at_1, retrieval_recall_at_1

__all__ = ["RetrievalScores", "evaluate_file", "evaluate_generative", "evaluate_retrieval",
           "normalize_answer", "qa_accuracy", "recall_at_1", "retrieval_recall_at_1"]
