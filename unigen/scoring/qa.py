"""Open-vocabulary QA accuracy: the generated answer must equal the reference after
normalisation (lower case, punctuation and articles dropped, whitespace collapsed); the relaxed
rule of :func:`relaxed_match` is reported beside it."""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def relaxed_match(prediction: str, reference: str) -> bool:
    """The reference's words appear, in order and adjacent, among the prediction's (after
    :func:`normalize_answer`): "black cat" counts for "cat". The paper adjudicated such near
    misses by hand (§4.2); this is that rule written down, reported beside exact match, never
    in its place (it also accepts "yes and no" for "yes")."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not ref:
        return not pred
    return any(pred[i:i + len(ref)] == ref for i in range(len(pred) - len(ref) + 1))


def qa_accuracy(model, images, questions: list[str], answers: list[str], *,
                batch_size: int = 64, max_new_tokens: int = 8) -> float:
    """Share of exact (normalised) matches of ``model.answer`` over the given QA pairs."""
    if len(questions) != len(answers) or len(questions) != len(images):
        raise ValueError(f"qa_accuracy: {len(images)} images, {len(questions)} questions and "
                         f"{len(answers)} answers must be the same number")
    if not questions:
        raise ValueError("qa_accuracy: no questions")
    hits = 0
    for s in range(0, len(questions), batch_size):
        preds = model.answer(images[s:s + batch_size], questions[s:s + batch_size],
                             max_new_tokens=max_new_tokens)
        hits += sum(normalize_answer(p) == normalize_answer(a)
                    for p, a in zip(preds, answers[s:s + batch_size]))
    return hits / len(questions)
