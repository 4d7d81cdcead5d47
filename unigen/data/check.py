"""Checks of a :class:`~unigen.data.config.DataConfig`'s sources that can be made before the
first step: every named file exists, WikiMatrix names parse into a language pair with an
English side, every image shard opens as a tar archive, every JSON-lines file starts with a
JSON object. A problem raises (:class:`~unigen.data.errors.DataFormatError` or
``FileNotFoundError``, naming the config key and the file) before a run folder is made, instead
of mid-run from a loader worker. A malformed line deep inside a file is still found only when
the stream reaches it.
"""

from __future__ import annotations

import tarfile

from .config import DataConfig
from .errors import DataFormatError
from .stream import JsonLinesStream, expand_paths, iter_text_lines
from .text_pairs import WikiMatrixStream, wikimatrix_source_column
from .webdataset_images import WebdatasetImageTextStream

# (config key, the patterns its directories are searched with, the kind of file)
_SOURCES = (
    ("wikimatrix", WikiMatrixStream.patterns, "wikimatrix"),
    ("cclm_text_pairs", JsonLinesStream.patterns, "jsonl"),
    ("image_shards", WebdatasetImageTextStream.patterns, "tar"),
    ("cc6l", JsonLinesStream.patterns, "jsonl"),
    ("ccqa", JsonLinesStream.patterns, "jsonl"),
)


def _check_tar(path: str) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            tar.next()
    except (tarfile.TarError, OSError, EOFError) as exc:
        # tarfile lists every compression it tried, one per line: the last is plain tar's
        why = str(exc).strip().splitlines()[-1].lstrip("- ") if str(exc).strip() else repr(exc)
        raise DataFormatError(path, None, f"not a readable tar archive ({why})") from None


def _check_jsonl(path: str) -> None:
    for lineno, line in iter_text_lines(path):
        if line.strip():
            JsonLinesStream.load_object((path, lineno, line))
            return


def check_sources(cfg: DataConfig) -> dict[str, int]:
    """Check every source ``cfg`` names (see the module docstring); returns the number of
    files per config key. Raises on the first problem."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"check_sources: cfg must be a DataConfig, got {type(cfg).__name__}")
    counts = {}
    for key, patterns, kind in _SOURCES:
        named = getattr(cfg, key)
        if not named:
            continue
        try:
            paths = expand_paths(list(named), what=f"data.{key}", patterns=patterns)
        except ValueError as exc:
            raise FileNotFoundError(str(exc)) from None
        for path in paths:
            try:
                if kind == "wikimatrix":
                    wikimatrix_source_column(path)
                elif kind == "tar":
                    _check_tar(path)
                else:
                    _check_jsonl(path)
            except DataFormatError as exc:
                raise DataFormatError(exc.path, exc.line, f"{exc.reason} (data.{key})") from None
        counts[key] = len(paths)
    return counts


def source_counts(cfg: DataConfig) -> dict[str, dict]:
    """Samples per source and language of every source ``cfg`` names, read through once
    (streamed; images are not decoded): ``{config key: {"languages": {lang: samples},
    "skipped": n}}``. WikiMatrix rows count at or above ``min_score``; CC6L counts captions per
    language of the lines whose key is in ``image_shards``; CCQA counts the pairs whose image is
    there; ``skipped`` counts the lines a run would skip (malformed, empty, or without an
    image)."""
    from collections import Counter

    from .multilingual_captions import MultilingualCaptionStream
    from .sizes import shard_sample_count
    from .text_pairs import CCLMTextPairStream
    from .webdataset_images import ImageStore

    check_sources(cfg)
    out = {}
    if cfg.image_shards:
        paths = expand_paths(list(cfg.image_shards), what="data.image_shards",
                             patterns=WebdatasetImageTextStream.patterns)
        out["image_shards"] = {"languages": {"en": sum(shard_sample_count(p) for p in paths)},
                               "skipped": 0}
    if cfg.wikimatrix:
        stream = WikiMatrixStream(list(cfg.wikimatrix), min_score=cfg.min_score, strict=False)
        out["wikimatrix"] = {"languages": dict(sorted(Counter(x["lang"] for x in stream).items())),
                             "skipped": stream.skipped.total}
    if cfg.cclm_text_pairs:
        stream = CCLMTextPairStream(list(cfg.cclm_text_pairs), strict=False)
        out["cclm_text_pairs"] = {"languages": dict(sorted(Counter(x["lang"] for x in stream).items())),
                                  "skipped": stream.skipped.total}
    # DataConfig requires image_shards for CC6L and CCQA: their keys name its images
    store = ImageStore(list(cfg.image_shards)) if cfg.cc6l or cfg.ccqa else None
    if cfg.cc6l:
        langs, skipped = Counter(), 0
        reader = MultilingualCaptionStream(list(cfg.cc6l), images=store)
        for path in reader.paths:
            for lineno, line in iter_text_lines(path):
                if not line.strip():
                    continue
                unit = (path, lineno, line)
                try:
                    obj = JsonLinesStream.load_object(unit)
                    caps = reader._captions(obj, unit)
                    ok = reader.require_str(obj, "key", unit) in store
                except DataFormatError:
                    ok = False
                if not ok or not caps.get(reader.english):
                    skipped += 1
                    continue
                langs.update(caps.keys())
        out["cc6l"] = {"languages": dict(sorted(langs.items())), "skipped": skipped}
    if cfg.ccqa:
        n = skipped = 0
        for path in expand_paths(list(cfg.ccqa), what="data.ccqa", patterns=JsonLinesStream.patterns):
            for lineno, line in iter_text_lines(path):
                if not line.strip():
                    continue
                try:
                    obj = JsonLinesStream.load_object((path, lineno, line))
                    ok = isinstance(obj.get("key"), str) and obj["key"] in store
                except DataFormatError:
                    ok = False
                n, skipped = n + ok, skipped + (not ok)
        out["ccqa"] = {"languages": {"en": n}, "skipped": skipped}
    return out


def main(argv=None) -> int:
    """``python -m unigen.data.check CONFIG.yaml``: check and count the sources its ``data``
    section names, before a run starts (exit status 2 and one line on the first problem)."""
    import argparse
    import sys

    from unigen.configuration import ConfigError, config_from_dict, read_config_file
    from unigen.version import add_version_argument

    parser = argparse.ArgumentParser(prog="python -m unigen.data.check", description=main.__doc__)
    add_version_argument(parser, parser.prog)
    parser.add_argument("config", help="a training config file (its data section is read)")
    args = parser.parse_args(argv)
    try:
        raw = read_config_file(args.config)
        cfg = config_from_dict(DataConfig, raw.get("data") or {}, prefix="data")
        rows = source_counts(cfg)
        store = _feature_store(cfg, raw) if cfg.image_features else None
    except (ConfigError, DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"unigen.data.check: {exc}", file=sys.stderr)
        return 2
    print(f"{'source':<16} {'language':<9} {'samples':>12}")
    for key, counts in rows.items():
        for lang, n in counts["languages"].items():
            print(f"{key:<16} {lang:<9} {n:>12,}")
        print(f"{key:<16} {'(skipped)':<9} {counts['skipped']:>12,}")
    if store is not None:
        print(f"{'image_features':<16} {'(images)':<9} {len(store):>12,}")
    return 0


def _feature_store(cfg: DataConfig, raw: dict):
    """``data.image_features`` opened and checked as a run opens it (the image size left unset
    is the model section's, as in a run)."""
    from .build import open_training_store
    from .feature_extraction import model_config_section

    if cfg.image_size is None:
        cfg.image_size = model_config_section(raw).vision.image_size
    return open_training_store(cfg)


if __name__ == "__main__":
    raise SystemExit(main())
