"""Synthetic multilingual sentences (en, fr, de) for tests and tiny tokenizers: captions built
from (colour, thing, place) ids, so the same ids give parallel sentences across languages."""

from __future__ import annotations

_COLORS = {"en": ["red", "blue", "green", "black", "white"],
           "fr": ["rouge", "bleu", "vert", "noir", "blanc"],
           "de": ["rot", "blau", "grün", "schwarz", "weiß"]}
_THINGS = {"en": ["cat", "dog", "car", "bird", "ball", "house"],
           "fr": ["chat", "chien", "voiture", "oiseau", "ballon", "maison"],
           "de": ["Katze", "Hund", "Auto", "Vogel", "Ball", "Haus"]}
_PLACES = {"en": ["on the grass", "near the tree", "in the street", "under the table"],
           "fr": ["sur l'herbe", "près de l'arbre", "dans la rue", "sous la table"],
           "de": ["auf dem Gras", "neben dem Baum", "auf der Straße", "unter dem Tisch"]}
_ARTICLE = {"en": "a", "fr": "un", "de": "ein"}


def synthetic_sentence(rng, lang: str = "en") -> tuple[str, tuple[int, int, int]]:
    """A caption-like sentence in ``lang`` ("en", "fr", "de") and its (color, thing, place) ids,
    so the same ids give parallel sentences across languages."""
    c, t, p = (rng.randrange(len(_COLORS["en"])), rng.randrange(len(_THINGS["en"])),
               rng.randrange(len(_PLACES["en"])))
    return sentence_of(lang, (c, t, p)), (c, t, p)


def sentence_of(lang: str, ids: tuple[int, int, int]) -> str:
    if lang not in _COLORS:
        raise ValueError(f"sentence_of: lang must be one of {sorted(_COLORS)}, got {lang!r}")
    c, t, p = ids
    if lang == "en":
        return f"{_ARTICLE[lang]} {_COLORS[lang][c]} {_THINGS[lang][t]} {_PLACES[lang][p]}"
    return f"{_ARTICLE[lang]} {_THINGS[lang][t]} {_COLORS[lang][c]} {_PLACES[lang][p]}"


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Deterministic multilingual text covering captions, questions and answers: enough to train
    the tiny tokenizers (every word of the synthetic vocabulary appears)."""
    import random

    rng = random.Random(seed)
    out = ["yes", "no", "what is the color of the thing?", "where is it?"]
    for lang in _COLORS:
        out += _COLORS[lang] + _THINGS[lang] + _PLACES[lang]
    for _ in range(n):
        lang = rng.choice(sorted(_COLORS))
        out.append(synthetic_sentence(rng, lang)[0])
    return out
