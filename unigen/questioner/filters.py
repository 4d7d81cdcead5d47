"""The rules a question–answer pair must pass to enter CCQA, each one counted.

They enforce the paper's three prompt rules after the fact, because an LLM follows a prompt only
most of the time (§3.2): the answer must come *exactly from the sentence* (a contiguous span of the
caption after case and punctuation normalisation — anything else is a hallucination), must not be
a yes/no answer, and must be short; the question must be a question and must not give its answer
away. Duplicate pairs for the same caption are dropped.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field

from .errors import UsageError
from .parsing import parse_generation

EMPTY = "empty_question_or_answer"
NOT_A_QUESTION = "not_a_question"
QUESTION_TOO_LONG = "question_too_long"
YES_NO = "yes_no"
ANSWER_TOO_LONG = "answer_too_long"
NOT_IN_CAPTION = "answer_not_in_caption"
QUESTION_CONTAINS_ANSWER = "question_contains_answer"
DUPLICATE = "duplicate"
OVER_MAX_PAIRS = "over_max_pairs"

_YES_NO_WORDS = frozenset({"yes", "no", "yeah", "yep", "nope", "true", "false", "correct", "incorrect"})
# A question opening with an auxiliary verb is polar ("Is the man sitting?") unless it offers
# alternatives ("Is the man sitting or standing?"), whatever span the model put as its answer.
_AUXILIARIES = frozenset(
    "is are was were am do does did can could will would shall should may might must has have had".split()
)
_ARTICLES = frozenset({"a", "an", "the"})


def normalize_tokens(text: str) -> list[str]:
    """Lower-case words with punctuation turned into spaces (NFKC first, so look-alikes match)."""
    text = unicodedata.normalize("NFKC", text).casefold()
    chars = [" " if unicodedata.category(c).startswith("P") else c for c in text]
    return "".join(chars).split()


def contains_span(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    if n == 0 or n > len(haystack):
        return False
    first = needle[0]
    for i in range(len(haystack) - n + 1):
        if haystack[i] == first and haystack[i : i + n] == needle:
            return True
    return False


@dataclass(frozen=True)
class PairFilter:
    """Thresholds of the per-pair rules; ``check`` returns the first rule a pair breaks, or None."""

    max_answer_words: int = 6
    max_question_words: int = 32

    def __post_init__(self):
        if not isinstance(self.max_answer_words, int) or self.max_answer_words < 1:
            raise UsageError(f"--max-answer-words must be a positive integer, got {self.max_answer_words!r}")
        if not isinstance(self.max_question_words, int) or self.max_question_words < 2:
            raise UsageError(f"--max-question-words must be an integer >= 2, got {self.max_question_words!r}")

    def check(self, caption_tokens: list[str], question: str, answer: str) -> str | None:
        q_tokens = normalize_tokens(question)
        a_tokens = normalize_tokens(answer)
        if not q_tokens or not [t for t in a_tokens if t not in _ARTICLES]:
            return EMPTY
        if not question.rstrip().endswith("?") or len(q_tokens) < 2:
            return NOT_A_QUESTION
        if len(q_tokens) > self.max_question_words:
            return QUESTION_TOO_LONG
        if a_tokens[0] in _YES_NO_WORDS or (q_tokens[0] in _AUXILIARIES and "or" not in q_tokens):
            return YES_NO
        if len(a_tokens) > self.max_answer_words:
            return ANSWER_TOO_LONG
        if not contains_span(caption_tokens, a_tokens):
            return NOT_IN_CAPTION
        if contains_span(q_tokens, a_tokens):
            return QUESTION_CONTAINS_ANSWER
        return None


@dataclass
class CaptionResult:
    """What one caption produced: the kept pairs and a count per rejection reason."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)


def judge_generation(
    caption: str, generation: str | None, pair_filter: PairFilter, max_pairs: int
) -> CaptionResult:
    """Parse a generation for ``caption`` and keep at most ``max_pairs`` distinct valid pairs."""
    result = CaptionResult()
    parsed = parse_generation(generation)
    result.rejected.update(parsed.rejected)
    caption_tokens = normalize_tokens(caption)
    seen: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
    for question, answer in parsed.pairs:
        reason = pair_filter.check(caption_tokens, question, answer)
        if reason is None:
            signature = (tuple(normalize_tokens(question)), tuple(normalize_tokens(answer)))
            if signature in seen:
                reason = DUPLICATE
            elif len(result.pairs) >= max_pairs:
                reason = OVER_MAX_PAIRS
            else:
                seen.add(signature)
                # Collapse whitespace, including U+2028 and friends that JSON keeps raw and some
                # line readers split on: one record must stay one line.
                result.pairs.append((" ".join(question.split()), " ".join(answer.split())))
                continue
        result.rejected[reason] += 1
    return result
