"""Multilingual image captions (CC6L: CC3M translated into cs, de, fr, ja, zh; paper §4.1).

JSON lines, one image per line, joined with the webdataset shards on ``key``::

    {"key": "000000123", "captions": {"en": "a dog ...", "de": "ein Hund ...", ...}}

(the flat form ``{"key": ..., "en": ..., "de": ...}`` is accepted too: every field other than
``key`` is then a language code). An English caption is required.

Per the paper only a fraction of the images (default 10%) is used with a randomly chosen
non-English caption; the rest use their English caption, because heavy use of the six major
languages hurt the alignment of languages that never appear with images. Which images are in
that fraction, and which language each gets, is a pure function of ``(seed, key)``, so the
choice survives resuming and is the same on every rank.

With ``all_languages`` (the "100% CC6L" row of Table 2) every image is used once per caption
language instead: each line is read as one unit per language of ``all_languages``, a language
the line lacks being filtered (counted in ``filtered``), so the position stays exact on resume.

Each sample: ``{"task", "key", "image", "caption", "lang", "english_caption", "origin"}``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from .errors import CorruptSampleError, DataFormatError, FilteredSampleError
from .stream import JsonLinesStream
from .webdataset_images import ImageStore

CC6L_TRANSLATIONS = ("cs", "de", "fr", "ja", "zh")
"""The languages UC2 translated CC3M's captions into (CC6L = these and English)."""


def _uniform(seed: int, key: str, salt: str) -> float:
    """A uniform number in [0, 1) from (seed, key): stable across processes and runs."""
    digest = hashlib.blake2b(f"{seed}\x1f{salt}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0 ** 64


class MultilingualCaptionStream(JsonLinesStream):
    """CC6L JSON lines + image shards → image–text samples, mostly English (see module doc).

    Args:
        images: an :class:`ImageStore` (or the shard paths to build one).
        multilingual_fraction: share of images given a random non-English caption (paper: 0.1).
        languages: the non-English languages that may be chosen (default: all present).
        image_transform: applied to the image bytes (decode errors skip the sample).
        image_ref: a feature-store run's image references (the bytes are not read; see
            :class:`~unigen.data.webdataset_images.WebdatasetImageTextStream`).
        task: task name of the samples (``"match"``: CC6L feeds image–text matching and the
            contrastive loss).
    """

    name = "cc6l"

    def __init__(self, paths, *, images: ImageStore | Any, multilingual_fraction: float = 0.1,
                 languages: Sequence[str] | None = None,
                 image_transform: Callable[[bytes], Any] | None = None, task: str = "match",
                 english: str = "en", all_languages: Sequence[str] | None = None,
                 image_ref: Callable[[str, int], Any] | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        if all_languages is not None and (not all_languages or english not in all_languages):
            raise ValueError(f"all_languages must name the captions' languages, {english!r} "
                             f"included, got {all_languages!r}")
        self.all_languages = None if all_languages is None else tuple(all_languages)
        if not 0.0 <= float(multilingual_fraction) <= 1.0:
            raise ValueError(f"multilingual_fraction must be in [0, 1], "
                             f"got {multilingual_fraction!r}")
        self.images = images if isinstance(images, ImageStore) else ImageStore(images)
        self.multilingual_fraction = float(multilingual_fraction)
        self.languages = None if languages is None else tuple(languages)
        self.image_transform = image_transform
        self.image_ref = image_ref
        self.task = task
        self.english = english

    def _captions(self, obj: dict, unit) -> dict[str, str]:
        path, lineno, _ = unit
        if "captions" in obj:
            caps = obj["captions"]
        else:  # the flat form: every field but the key is a language
            caps = {k: v for k, v in obj.items() if k != "key"}
        if not isinstance(caps, dict):
            raise DataFormatError(path, lineno,
                                  "field 'captions' must be an object {lang: caption}")
        for lang, text in caps.items():
            if not isinstance(text, str):
                raise DataFormatError(path, lineno, f"caption for {lang!r} must be a string, got "
                                                    f"{type(text).__name__}")
        if self.english not in caps:
            raise DataFormatError(path, lineno, f"no {self.english!r} caption (languages: "
                                                f"{sorted(caps)})")
        return {lang: text.strip() for lang, text in caps.items() if text.strip()}

    def _units(self, path: str):
        if self.all_languages is None:
            yield from super()._units(path)
            return
        for location, unit in super()._units(path):
            for lang in self.all_languages:
                yield f"{location}[{lang}]", (unit, lang)

    def _parse(self, unit, location: str) -> dict:
        wanted = None
        if self.all_languages is not None:
            unit, wanted = unit
        obj = self.load_object(unit)
        key = self.require_str(obj, "key", unit)
        caps = self._captions(obj, unit)
        english = caps.get(self.english)
        if not english:
            raise CorruptSampleError("empty_text", location)
        lang = self.english
        if wanted is not None:
            if wanted not in caps:
                raise FilteredSampleError(f"no {wanted!r} caption")
            lang = wanted
        elif _uniform(self.seed, key, "fraction") < self.multilingual_fraction:
            pool = sorted(l for l in caps if l != self.english
                          and (self.languages is None or l in self.languages))
            if pool:
                lang = pool[int(_uniform(self.seed, key, "lang") * len(pool))]
        image = (self.image_ref(self.images.require(key, location), self._epoch)
                 if self.image_ref is not None else
                 self.images.load(key, self.image_transform, location))
        return {"task": self.task, "key": key, "image": image, "caption": caps[lang],
                "lang": lang, "english_caption": english, "origin": location,
                "image_origin": self.images.origin(key)}
