"""Multilingual–English text pairs for the translation task (paper §3.3, §4.1).

Two formats:

* WikiMatrix ``.tsv[.gz]``: ``margin score <TAB> sentence <TAB> sentence`` per line; the file
  name ``WikiMatrix.<l1>-<l2>.tsv[.gz]`` gives the language of the two sentence columns. One of
  them must be the target language (English: UniGen's decoder is English-only, English is the
  pivot). Rows under ``min_score`` are dropped, as in CCLM's use of the corpus.
* CCLM-style JSON lines: ``{"source_text": ..., "target_text": ...}`` with an optional
  ``"lang"`` (else the language from a ``.<lang>-en.`` part of the file name, else ``"xx"``).

Each sample: ``{"task": "trans", "source_text", "target_text", "lang", "score", "origin"}``
(``score`` is ``None`` for JSON lines, ``origin`` is ``"file:line"``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from .errors import CorruptSampleError, DataFormatError, FilteredSampleError
from .stream import JsonLinesStream, RecordStream, iter_text_lines

# an optional part number: the shards `python -m unigen.data.prepare wikimatrix` writes
_WIKIMATRIX_NAME = re.compile(r"WikiMatrix\.([A-Za-z_]+)-([A-Za-z_]+)(\.\d+)?\.tsv(\.gz)?$")
_LANG_PAIR_IN_NAME = re.compile(r"(?:^|[._])([A-Za-z_]{2,8})-([A-Za-z_]{2,8})(?:[._])")


def wikimatrix_languages(path: str) -> tuple[str, str]:
    """The two column languages of a WikiMatrix file, from its name."""
    m = _WIKIMATRIX_NAME.search(os.path.basename(path))
    if m is None:
        raise DataFormatError(path, None, "WikiMatrix file names must look like "
                                          "'WikiMatrix.<lang1>-<lang2>.tsv[.gz]'")
    return m.group(1), m.group(2)


def wikimatrix_source_column(path: str, target_lang: str = "en") -> tuple[int, str]:
    """(column of the non-English sentence, its language) of a WikiMatrix file, from its name;
    a name that does not parse or a pair without a ``target_lang`` side raises
    :class:`DataFormatError`."""
    l1, l2 = wikimatrix_languages(path)
    if target_lang not in (l1, l2):
        raise DataFormatError(path, None, f"pair {l1}-{l2} has no {target_lang!r} side; "
                                          f"UniGen translates into {target_lang!r} only")
    if l1 == l2:
        raise DataFormatError(path, None, f"pair {l1}-{l2} has the same language twice")
    return (2, l2) if l1 == target_lang else (1, l1)


class WikiMatrixStream(RecordStream):
    """WikiMatrix tsv files → translation samples (non-English source, English target)."""

    name = "wikimatrix"
    patterns = ("WikiMatrix.*.tsv", "WikiMatrix.*.tsv.gz")

    def __init__(self, paths, *, min_score: float | None = None, target_lang: str = "en",
                 **kwargs):
        super().__init__(paths, **kwargs)
        self.min_score = min_score
        self.target_lang = target_lang
        # fail on a bad name before any training starts
        self._columns = {path: wikimatrix_source_column(path, target_lang) for path in self.paths}

    def _units(self, path: str) -> Iterator[tuple[str, Any]]:
        for lineno, line in iter_text_lines(path):
            if line.strip():
                yield f"{path}:{lineno}", (path, lineno, line)

    def _parse(self, unit, location: str) -> dict:
        path, lineno, line = unit
        cols = line.split("\t")
        if len(cols) != 3:
            raise DataFormatError(path, lineno, f"expected 3 tab-separated columns (score, "
                                                f"sentence, sentence), got {len(cols)}")
        try:
            score = float(cols[0])
        except ValueError:
            raise DataFormatError(path, lineno, f"margin score {cols[0]!r} is not a number") \
                from None
        if self.min_score is not None and score < self.min_score:
            raise FilteredSampleError(f"{score} < {self.min_score}")
        src_col, lang = self._columns[path]
        source, target = cols[src_col].strip(), cols[3 - src_col].strip()
        if not source or not target:
            raise CorruptSampleError("empty_text", location)
        return {"task": "trans", "source_text": source, "target_text": target, "lang": lang,
                "score": score, "origin": location}


class CCLMTextPairStream(JsonLinesStream):
    """CCLM-style ``{"source_text", "target_text"}`` JSON lines → translation samples."""

    name = "cclm_text_pairs"

    def __init__(self, paths, *, target_lang: str = "en", **kwargs):
        super().__init__(paths, **kwargs)
        self.target_lang = target_lang
        self._file_lang = {}
        for path in self.paths:
            m = _LANG_PAIR_IN_NAME.search(os.path.basename(path))
            lang = "xx"
            if m is not None and target_lang in m.groups():
                lang = m.group(1) if m.group(2) == target_lang else m.group(2)
            self._file_lang[path] = lang

    def _parse(self, unit, location: str) -> dict:
        obj = self.load_object(unit)
        source = self.require_str(obj, "source_text", unit).strip()
        target = self.require_str(obj, "target_text", unit).strip()
        if not source or not target:
            raise CorruptSampleError("empty_text", location)
        lang = obj.get("lang", self._file_lang[unit[0]])
        if not isinstance(lang, str):
            raise DataFormatError(unit[0], unit[1], f"field 'lang' must be a string, got "
                                                    f"{type(lang).__name__}")
        return {"task": "trans", "source_text": source, "target_text": target, "lang": lang,
                "score": None, "origin": location}
