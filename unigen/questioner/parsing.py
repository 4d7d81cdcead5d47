"""Turn one generation into question–answer candidates, without guessing.

The prompt ends with ``<sentence> {caption} <question>``, so a well-behaved continuation reads
``What is the worker in front of? <answer> young people.`` and then either stops or starts the
next example with ``<sentence>``. Everything from the first ``<sentence>`` on is about another
sentence and is discarded. A model may also emit several ``<question> … <answer> …`` pairs for the
same sentence; each complete pair becomes a candidate. Anything that does not fit the pattern
(an answer with no question, a question cut off before its answer, a question spread over
several lines) is reported as malformed, never repaired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .prompt import ANSWER_TAG, QUESTION_TAG, SENTENCE_TAG

EMPTY_GENERATION = "empty_generation"
MALFORMED = "malformed"

_SPLIT = re.compile(f"({re.escape(QUESTION_TAG)}|{re.escape(ANSWER_TAG)})")


@dataclass
class ParsedGeneration:
    """The complete pairs found in a generation, and one reason per piece that was not a pair."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


def parse_generation(text: str | None) -> ParsedGeneration:
    out = ParsedGeneration()
    if text is None or not text.strip():
        out.rejected.append(EMPTY_GENERATION)
        return out
    text = text.split(SENTENCE_TAG, 1)[0]
    if not text.strip():
        out.rejected.append(EMPTY_GENERATION)
        return out
    stripped = text.lstrip()
    # The prompt already opened the first question; a model that repeats the tag is fine too.
    if not stripped.startswith((QUESTION_TAG, ANSWER_TAG)):
        stripped = QUESTION_TAG + " " + stripped
    parts = [p for p in _SPLIT.split(stripped) if p != ""]
    # parts alternates tag, body, tag, body ... (a tag may be followed directly by another tag,
    # in which case its body is missing: that piece is malformed).
    pieces: list[tuple[str, str]] = []
    i = 0
    while i < len(parts):
        tag = parts[i]
        if tag not in (QUESTION_TAG, ANSWER_TAG):
            # Only possible for leading text, which the prefixing above rules out; kept as a guard.
            out.rejected.append(MALFORMED)
            i += 1
            continue
        body = ""
        if i + 1 < len(parts) and parts[i + 1] not in (QUESTION_TAG, ANSWER_TAG):
            body = parts[i + 1]
            i += 2
        else:
            i += 1
        pieces.append((tag, body))

    j = 0
    while j < len(pieces):
        tag, body = pieces[j]
        if tag == QUESTION_TAG and j + 1 < len(pieces) and pieces[j + 1][0] == ANSWER_TAG:
            question = body.strip()
            answer_body = pieces[j + 1][1]
            # The answer runs to the end of its line: text on later lines is the model rambling
            # on after the pair (it had no stop string), not part of the answer.
            answer = answer_body.strip().split("\n", 1)[0].strip()
            if "\n" in question:
                out.rejected.append(MALFORMED)
            else:
                out.pairs.append((question, answer))
            j += 2
        else:
            # A question with no answer (cut off by the token limit), or an answer with no question.
            out.rejected.append(MALFORMED)
            j += 1
    return out
