"""Sizes of the training sources, read before a run starts (for ``schedule.epochs`` and
``python -m unigen.data.check``).

img2dataset writes, beside each webdataset shard ``NNNNN.tar``, a ``NNNNN_stats.json`` whose
``successes`` is the number of samples the shard holds (its ``count`` includes the failed
downloads); a shard without one is counted by listing its members (distinct keys with an
image).
"""

from __future__ import annotations

import json
import os
import tarfile

from .errors import DataFormatError
from .stream import expand_paths
from .webdataset_images import WebdatasetImageTextStream

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


def shard_sample_count(path: str, *, use_stats: bool = True) -> int:
    """Samples in one webdataset shard: img2dataset's stats file when present (and
    ``use_stats``), else a scan of the tar's members."""
    stem = path
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    stats = stem + "_stats.json"
    if use_stats and os.path.isfile(stats):
        try:
            with open(stats, encoding="utf-8") as f:
                return int(json.load(f)["successes"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(stats, None, f"not an img2dataset stats file with "
                                               f"'successes' ({exc})") from None
    keys = set()
    try:
        with tarfile.open(path, "r|*") as tar:  # streamed: no index of a large archive
            for member in tar:
                base, ext = os.path.splitext(member.name)
                if member.isfile() and ext.lower() in _IMAGE_EXTENSIONS:
                    keys.add(base)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFormatError(path, None, f"not a readable tar archive ({exc})") from None
    return len(keys)


def image_pair_count(image_shards) -> int:
    """Image-text pairs in ``data.image_shards`` (files, directories or globs)."""
    paths = expand_paths(list(image_shards), what="data.image_shards",
                         patterns=WebdatasetImageTextStream.patterns)
    return sum(shard_sample_count(p) for p in paths)
