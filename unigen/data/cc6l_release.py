"""CC6L as UC2 and CCLM distribute it → the CC6L caption lines the training reads
(:mod:`unigen.data.multilingual_captions`), keyed to the img2dataset download of CC3M.

Neither release ships images: both give CC3M's captions machine-translated, identified by the
image's URL. The images come from img2dataset (``--output_format webdataset``), which names
each sample by a key of its own; its per-shard ``NNNNN.parquet`` lists ``url``, ``key`` and
``status`` for every row it tried. The join is by URL over the rows with status ``success``:

* **UC2** (the translation files behind its README's "text translation of CC captions"; its
  ``utils/ms_internal_mt.py`` writes them): one TSV per language, ``<split>_imageId2Ann.tsv``
  for English and ``<split>_imageId2Ann_<lang>.tsv`` for cs, de, fr, ja, zh, written with
  ``csv.writer(delimiter="\\t")``; four columns ``image id, image URL, caption, success``. A row
  whose last column is not ``success`` (the translator failed) is skipped and counted. The
  language comes from the file name (``--lang`` overrides it for a single file).
* **CCLM** (its translation of COCO+VG+SBU+CC3M; ``dataset/pretrain_dataset_multilingual.py``
  reads it): JSON lines whose ``caption`` is a ``{language: text}`` dict, or a list of such
  dicts (the first is taken, as one image's captions). The field that holds the image's URL is
  not documented for the text-only release: ``url_field`` names it (default ``url``); a record
  without it stops with the fields it has.

Output: ``{"key": <img2dataset key>, "captions": {"en": ..., "de": ..., ...}}`` per image,
sorted by key; images without an English caption are skipped and counted (the reader needs
one). Captions are collected in memory (about 1 KB per image: ~3 GB for CC3M's 3.3 M) because a
language file need not follow the download's order. The output is written under a temporary
name and renamed when complete, with ``<out>.done.json`` holding the counts; a rerun with that
file present does nothing (resumable at the granularity of the whole join, which takes minutes,
not the download's hours). Progress is printed every ``progress_every`` lines.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator

from .errors import DataFormatError
from .stream import expand_paths, iter_text_lines

UC2_FILE = re.compile(r"imageId2Ann(?:_([a-z]{2}(?:-[A-Za-z]+)?))?\.tsv(?:\.gz)?$")
"""UC2's caption files: no language suffix = English (the translator's source)."""


def _files(inputs: Iterable[str], source: str) -> list[str]:
    """The release's files among ``inputs`` (files, folders searched recursively, globs), with
    the data streams' one rule (:func:`unigen.data.stream.expand_paths`)."""
    patterns = ("*imageId2Ann*.tsv", "*imageId2Ann*.tsv.gz") if source == "uc2" else ("*",)
    return [p for p in expand_paths(list(inputs), what="cc6l", patterns=patterns)
            if os.path.isfile(p)]


def img2dataset_url_keys(folder: str) -> tuple[dict[str, str], dict[str, int]]:
    """``url → key`` of the successfully downloaded rows of an img2dataset output folder (its
    ``NNNNN.parquet`` files), and counts {"rows", "downloaded", "duplicate_urls"}."""
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is in the data extra
        raise ImportError("cc6l: reading img2dataset's parquet files needs pyarrow "
                          "(pip install pyarrow, or the unigen[data] extra)") from None
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cc6l: img2dataset folder {folder!r} is not a directory")
    names = sorted(n for n in os.listdir(folder) if re.fullmatch(r"\d+\.parquet", n))
    if not names:
        raise DataFormatError(folder, None, "no NNNNN.parquet files (img2dataset writes one per "
                                            "shard beside its tar)")
    url_keys: dict[str, str] = {}
    counts = {"rows": 0, "downloaded": 0, "duplicate_urls": 0}
    for name in names:
        path = os.path.join(folder, name)
        table = pq.read_table(path)
        missing = {"url", "key", "status"} - set(table.column_names)
        if missing:
            raise DataFormatError(path, None, f"img2dataset parquet without column(s) "
                                              f"{sorted(missing)}: has {table.column_names}")
        for url, key, status in zip(*(table.column(c).to_pylist() for c in ("url", "key", "status"))):
            counts["rows"] += 1
            if status != "success":
                continue
            counts["downloaded"] += 1
            if url in url_keys:
                counts["duplicate_urls"] += 1  # the same picture twice: the first key stands
                continue
            url_keys[url] = key
    return url_keys, counts


def _uc2_language(path: str, lang: str | None) -> str:
    if lang is not None:
        return lang
    m = UC2_FILE.search(os.path.basename(path))
    if m is None:
        raise DataFormatError(path, None, "not a UC2 caption file name (<split>_imageId2Ann"
                                          "[_<lang>].tsv); give its language with --lang")
    return m.group(1) or "en"


def iter_uc2(path: str, lang: str | None, counts: dict) -> Iterator[tuple[int, str, str, str]]:
    """(line, language, url, caption) of one UC2 TSV; bad and failed rows counted, skipped."""
    language = _uc2_language(path, lang)
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        counts["lines"] += 1
        try:
            cols = next(csv.reader(io.StringIO(line), delimiter="\t"))
        except csv.Error:
            cols = []
        if len(cols) != 4:
            counts["bad_lines"] += 1
            continue
        _, url, caption, success = cols
        if success.strip() != "success":
            counts["failed_translations"] += 1
            continue
        if not url.strip() or not caption.strip():
            counts["bad_lines"] += 1
            continue
        yield lineno, language, url.strip(), caption.strip()


def iter_cclm(path: str, url_field: str, counts: dict) -> Iterator[tuple[int, str, str, str]]:
    """(line, language, url, caption) of one CCLM JSON-lines file, one item per language."""
    for lineno, line in iter_text_lines(path):
        if not line.strip():
            continue
        counts["lines"] += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            counts["bad_lines"] += 1
            continue
        if not isinstance(record, dict):
            counts["bad_lines"] += 1
            continue
        if url_field not in record:
            raise DataFormatError(path, lineno, f"no {url_field!r} field (the image URL) in a CCLM "
                                                f"record; it has {sorted(record)}: name the URL "
                                                f"field with --url-field")
        captions = record.get("caption")
        if isinstance(captions, list) and captions:
            captions = captions[0]
        url = record[url_field]
        if not isinstance(captions, dict) or not isinstance(url, str) or not url.strip():
            counts["bad_lines"] += 1
            continue
        for language, caption in captions.items():
            if isinstance(caption, str) and caption.strip():
                yield lineno, str(language), url.strip(), caption.strip()
            else:
                counts["empty_captions"] += 1


def prepare_cc6l(inputs: Iterable[str], img2dataset_folder: str, out: str, *,
                 source: str = "uc2", lang: str | None = None, url_field: str = "url",
                 english: str = "en", progress_every: int = 500_000,
                 log: Callable[[str], None] = print) -> dict:
    """Join the release's captions to the download's keys (module docstring); returns counts."""
    if source not in ("uc2", "cclm"):
        raise ValueError(f"cc6l: source must be 'uc2' or 'cclm', got {source!r}")
    done = out + ".done.json"
    if os.path.isfile(done) and os.path.isfile(out):
        with open(done, encoding="utf-8") as f:
            counts = json.load(f)
        log(f"cc6l: {out} done before ({counts['images']} images; remove {done} to redo)")
        return counts
    files = _files(inputs, source)
    if lang is not None and len(files) != 1:
        raise ValueError(f"cc6l: --lang names the language of one file, got {len(files)} files")
    url_keys, download = img2dataset_url_keys(img2dataset_folder)
    log(f"cc6l: {download['downloaded']} downloaded images of {download['rows']} rows in "
        f"{img2dataset_folder}")
    counts = {"files": len(files), "lines": 0, "bad_lines": 0, "failed_translations": 0,
              "empty_captions": 0, "not_downloaded": 0, "captions": 0, "no_english": 0,
              "images": 0, **{f"download_{k}": v for k, v in download.items()}}
    per_language: dict[str, int] = {}
    captions: dict[str, dict[str, str]] = {}
    next_log = progress_every
    for path in files:
        items = (iter_uc2(path, lang, counts) if source == "uc2"
                 else iter_cclm(path, url_field, counts))
        for _, language, url, caption in items:
            key = url_keys.get(url)
            if key is None:
                counts["not_downloaded"] += 1
                continue
            # a repeated (image, language) keeps its first caption, as the download keeps its key
            image = captions.setdefault(key, {})
            if language not in image:
                image[language] = caption
                counts["captions"] += 1
                per_language[language] = per_language.get(language, 0) + 1
            if counts["lines"] >= next_log:
                log(f"cc6l: {counts['lines']} lines read, {counts['captions']} captions joined")
                next_log += progress_every
        log(f"cc6l: {path}: {counts['lines']} lines read so far")
    tmp = out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for key in sorted(captions):
            caps = captions[key]
            if english not in caps:
                counts["no_english"] += 1
                continue
            f.write(json.dumps({"key": key, "captions": caps}, ensure_ascii=False) + "\n")
            counts["images"] += 1
    os.replace(tmp, out)
    counts["per_language"] = dict(sorted(per_language.items()))
    with open(done, "w", encoding="utf-8") as f:
        json.dump(counts, f)
    log(f"cc6l: {counts['images']} images → {out}; captions per language "
        f"{counts['per_language']}; skipped: bad lines {counts['bad_lines']}, failed "
        f"translations {counts['failed_translations']}, empty {counts['empty_captions']}, not "
        f"downloaded {counts['not_downloaded']}, no English {counts['no_english']}")
    return counts
