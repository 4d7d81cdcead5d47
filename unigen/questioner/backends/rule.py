"""A deterministic question–answer extractor with no LLM: for tests, and as a fallback.

It reads the caption with three patterns that CC3M captions are full of and writes its result in
the exact format an LLM answers the §3.2 prompt with (``Q <answer> A <question> Q <answer> A``),
so its output goes through the same parser and filters as any LLM's:

- a count: ``two dogs …`` → ``How many dogs are there?`` / ``two``;
- a colour: ``… a red dress …`` → ``What color is the dress?`` / ``red``;
- a prepositional relation: ``a worker sits on a bench …`` → ``A worker sits on what?`` / ``bench``
  (the object phrase runs to the next preposition, conjunction or punctuation, article dropped).

It finds fewer pairs than an LLM and its questions are plainer, but every answer it gives is a
span of the caption by construction.
"""

from __future__ import annotations

from .base import Backend, Generation

_NUMBERS = frozenset(
    "two three four five six seven eight nine ten eleven twelve twenty thirty hundred".split()
) | frozenset(str(n) for n in range(2, 100))
_COLOURS = frozenset(
    "red orange yellow green blue purple pink brown black white grey gray silver golden".split()
)
# Longest first, so "in front of" wins over "in".
_PREPOSITIONS = sorted(
    (
        tuple(p.split())
        for p in [
            "in front of", "on top of", "next to", "close to", "in the middle of", "on", "in", "at",
            "under", "above", "behind", "near", "beside", "inside", "over", "along", "across",
            "through", "with", "against", "during", "into", "onto", "towards", "around",
        ]
    ),
    key=len,
    reverse=True,
)
_BOUNDARIES = frozenset(
    "and or but while as that which who where when during after before because".split()
)
_SKIP_NOUN = frozenset("of in on at and or with to for from by the a an".split()) | _COLOURS
_ARTICLES = frozenset({"a", "an", "the"})
_MAX_OBJECT_WORDS = 5


def _bare(word: str) -> str:
    return word.strip(".,;:!?\"'()[]").lower()


def _ends_clause(word: str) -> bool:
    return word[-1:] in ".,;:!?"


def _count_pair(words: list[str]) -> tuple[str, str] | None:
    for i, w in enumerate(words[:-1]):
        if _bare(w) in _NUMBERS and not _ends_clause(w):
            noun = _bare(words[i + 1])
            if noun.isalpha() and noun not in _SKIP_NOUN:
                return f"How many {noun} are there?", _bare(w)
    return None


def _colour_pair(words: list[str]) -> tuple[str, str] | None:
    for i, w in enumerate(words[:-1]):
        # "black and white photo": a colour in a coordination is not the thing's one colour.
        if i and _bare(words[i - 1]) in ("and", "or"):
            continue
        if _bare(w) in _COLOURS and not _ends_clause(w):
            noun = _bare(words[i + 1])
            if noun.isalpha() and noun not in _SKIP_NOUN:
                return f"What color is the {noun}?", _bare(w)
    return None


def _match_preposition(bare: list[str], i: int) -> int:
    for prep in _PREPOSITIONS:
        if tuple(bare[i : i + len(prep)]) == prep:
            return len(prep)
    return 0


def _relation_pair(words: list[str]) -> tuple[str, str] | None:
    bare = [_bare(w) for w in words]
    # Need a subject of two words or more before the preposition to ask about.
    for i in range(2, len(words) - 1):
        if _ends_clause(words[i - 1]):
            return None  # only the first clause: later ones have no subject of their own
        n = _match_preposition(bare, i)
        if not n:
            continue
        obj: list[str] = []
        for j in range(i + n, len(words)):
            if bare[j] in _BOUNDARIES or (obj and _match_preposition(bare, j)):
                break
            obj.append(words[j])
            if _ends_clause(words[j]) or len(obj) > _MAX_OBJECT_WORDS:
                break
        if obj and _bare(obj[0]) in _ARTICLES:
            obj = obj[1:]
        answer = " ".join(obj).strip(".,;:!?\"'()[]")
        if not answer or len(obj) > _MAX_OBJECT_WORDS or not any(c.isalpha() for c in answer):
            continue
        subject = " ".join(words[: i + n]).strip(",;:")
        question = subject[0].upper() + subject[1:] + " what?"
        return question, answer
    return None


def extract_pairs(caption: str) -> list[tuple[str, str]]:
    words = caption.split()
    pairs = []
    for rule in (_relation_pair, _count_pair, _colour_pair):
        pair = rule(words)
        if pair is not None:
            pairs.append(pair)
    return pairs


class RuleBackend(Backend):
    name = "rule"
    default_batch_size = 256  # pure Python, microseconds per caption: batch only to amortise I/O

    def generate(self, prompts: list[str], captions: list[str]) -> list[Generation]:
        out = []
        for caption in captions:
            pairs = extract_pairs(caption)
            # The prompt ends in "<question>", so the first question comes without its tag.
            out.append(" <question> ".join(f"{q} <answer> {a}" for q, a in pairs))
        return out
