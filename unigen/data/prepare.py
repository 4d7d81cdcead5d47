"""From the public releases to the files the training streams read:
``python -m unigen.data.prepare {wikimatrix,cc3m-check,cc6l} ...``.

``wikimatrix``: WikiMatrix as released by LASER (``WikiMatrix.<l1>-<l2>.tsv.gz``, one pair per
line: ``margin score<TAB>sentence in l1<TAB>sentence in l2``, the pair's languages in
alphabetical order, lines sorted by decreasing score) → the pairs of English with IGLUE's
languages at or above a margin threshold, deduplicated, in gzip shards
``<l1>-<l2>/WikiMatrix.<l1>-<l2>.<part>.tsv.gz`` of the same line format. Streamed (one line in
memory, a set of 16-byte digests for the deduplication), resumable (a language pair whose
``done.json`` exists is skipped; a shard is written to a temporary name and renamed when
complete, so a stopped run leaves no half shard), and bad lines (not three columns, a score
that is no number, an empty side) are skipped and counted.

``cc3m-check``: an img2dataset output folder (``--output_format webdataset``: ``NNNNN.tar``
beside ``NNNNN_stats.json`` and ``NNNNN.parquet``) is complete when every shard number from 0
to the last has its tar and its stats, and each tar holds the ``successes`` its stats count.

``cc6l``: UC2's or CCLM's translated CC3M captions joined by URL to the img2dataset keys of
that folder (:mod:`unigen.data.cc6l_release`).

``image-features``: the frozen ViT's output for every image of a training config's image
sources, computed once into a feature store that ``data.image_features`` trains from
(:mod:`unigen.data.feature_extraction`, :mod:`unigen.data.feature_store`); under torchrun each
process takes its share of the shards.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys

from .cc6l_release import prepare_cc6l
from .errors import DataFormatError
from .sizes import shard_sample_count
from .stream import iter_text_lines

IGLUE_LANGUAGES = ("ar", "bg", "bn", "da", "de", "el", "es", "et", "fr", "id", "ja", "ko", "pt",
                   "ru", "sw", "ta", "tr", "vi", "zh")
"""The languages of IGLUE's tasks besides English (XVNLI, xGQA, MaRVL, xFlickr&CO, WIT)."""

_RELEASE_NAME = re.compile(r"^WikiMatrix\.([a-z_]+)-([a-z_]+)\.tsv(\.gz)?$")


def _release_files(inputs) -> dict[tuple[str, str], str]:
    found = {}
    for item in inputs:
        paths = ([os.path.join(item, n) for n in sorted(os.listdir(item))] if os.path.isdir(item)
                 else [item])
        for path in paths:
            m = _RELEASE_NAME.match(os.path.basename(path))
            if m is not None:
                found[(m.group(1), m.group(2))] = path
    return found


def prepare_wikimatrix(inputs, out_dir: str, *, languages=IGLUE_LANGUAGES,
                       min_score: float = 1.04, shard_lines: int = 500_000,
                       log=print) -> dict[str, dict]:
    """Select, deduplicate and shard (module docstring); returns the counts per pair."""
    if not 0 < shard_lines:
        raise ValueError(f"shard_lines must be positive, got {shard_lines}")
    files = _release_files(inputs)
    pairs = {tuple(sorted((lang, "en"))) for lang in languages}
    missing = sorted(f"{a}-{b}" for a, b in pairs if (a, b) not in files)
    if missing:
        raise FileNotFoundError(f"wikimatrix: no WikiMatrix.<pair>.tsv[.gz] for {missing} in "
                                f"{list(inputs)}")
    report = {}
    for a, b in sorted(pairs):
        name = f"{a}-{b}"
        folder = os.path.join(out_dir, name)
        done = os.path.join(folder, "done.json")
        if os.path.isfile(done):
            with open(done, encoding="utf-8") as f:
                report[name] = json.load(f)
            log(f"wikimatrix {name}: done before, {report[name]['kept']} pairs (skipped)")
            continue
        os.makedirs(folder, exist_ok=True)
        counts = {"read": 0, "kept": 0, "below_threshold": 0, "duplicates": 0, "bad_lines": 0,
                  "shards": 0}
        seen: set[bytes] = set()
        shard = None

        def close(shard):
            tmp, final, handle = shard
            handle.close()
            os.replace(tmp, final)

        for _, line in iter_text_lines(files[(a, b)]):
            counts["read"] += 1
            cols = line.split("\t")
            try:
                score = float(cols[0]) if len(cols) == 3 else None
            except ValueError:
                score = None
            if score is None or not cols[1].strip() or not cols[2].strip():
                counts["bad_lines"] += 1
                continue
            if score < min_score:
                counts["below_threshold"] += 1
                continue
            key = hashlib.blake2b(f"{cols[1].strip()}\t{cols[2].strip()}".encode(),
                                  digest_size=16).digest()
            if key in seen:
                counts["duplicates"] += 1
                continue
            seen.add(key)
            if shard is None or counts["kept"] % shard_lines == 0:
                if shard is not None:
                    close(shard)
                final = os.path.join(folder, f"WikiMatrix.{name}.{counts['shards']:05d}.tsv.gz")
                shard = (final + ".tmp", final, gzip.open(final + ".tmp", "wt", encoding="utf-8"))
                counts["shards"] += 1
            shard[2].write(f"{score}\t{cols[1].strip()}\t{cols[2].strip()}\n")
            counts["kept"] += 1
        if shard is not None:
            close(shard)
        with open(done, "w", encoding="utf-8") as f:
            json.dump(counts, f)
        report[name] = counts
        log(f"wikimatrix {name}: read {counts['read']}, kept {counts['kept']} in "
            f"{counts['shards']} shard(s); below {min_score}: {counts['below_threshold']}, "
            f"duplicates: {counts['duplicates']}, bad lines: {counts['bad_lines']}")
    return report


_SHARD = re.compile(r"^(\d+)\.tar$")
_STATS = re.compile(r"^(\d+)_stats\.json$")


def check_img2dataset_folder(folder: str) -> dict:
    """Problems of an img2dataset webdataset folder (module docstring); raises
    DataFormatError listing them, else returns ``{"shards", "samples"}``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cc3m-check: {folder!r} is not a directory")
    names = os.listdir(folder)
    tars = {int(m.group(1)): m.group(1) for n in names if (m := _SHARD.match(n))}
    stats = {int(m.group(1)): m.group(1) for n in names if (m := _STATS.match(n))}
    if not tars and not stats:
        raise DataFormatError(folder, None, "no NNNNN.tar shards (img2dataset --output_format "
                                            "webdataset writes them)")
    width = len(next(iter({**stats, **tars}.values())))
    problems, samples = [], 0
    for i in range(max({**stats, **tars}) + 1):
        label = f"shard {i:0{width}d}"
        if i not in tars:
            problems.append(f"{label}: no tar")
            continue
        if i not in stats:
            problems.append(f"{label}: no _stats.json (unfinished download)")
            continue
        tar = os.path.join(folder, tars[i] + ".tar")
        expected = shard_sample_count(tar)  # the stats' successes
        found = shard_sample_count(tar, use_stats=False)
        if found != expected:
            problems.append(f"{label}: {found} samples in the tar, its stats say {expected}")
        samples += found
    if problems:
        raise DataFormatError(folder, None, "incomplete img2dataset folder: " + "; ".join(problems))
    return {"shards": len(tars), "samples": samples}


def _image_features(args) -> None:
    from unigen.configuration import read_config_file

    from .feature_extraction import extract_features, plan_from_config, store_summary

    out = args.out or (read_config_file(args.config).get("data") or {}).get("image_features")
    if not out:
        raise ValueError("image-features: give --out DIR (the config sets no "
                         "data.image_features)")
    plan = plan_from_config(args.config, images_per_file=args.images_per_file)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import datetime

        import torch.distributed as dist

        # only to wait for every process at the end; a rank may finish hours before another
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    try:
        counts = extract_features(plan, out, dtype=args.dtype, views=args.views,
                                  crop_seed=args.crop_seed, batch_size=args.batch_size,
                                  images_per_file=args.images_per_file, workers=args.workers,
                                  device=args.device)
        who = f"rank {os.environ.get('RANK', '0')} stored" if world > 1 else "stored"
        print(f"image-features: {who} {counts['images']} images of {counts['units']} unit(s) "
              f"({counts['undecodable']} undecodable, {counts['no_image']} samples without "
              f"image; {counts['skipped_units']} unit(s) done before)", flush=True)
        if world > 1:
            dist.barrier()
        if int(os.environ.get("RANK", "0")) == 0:
            print(store_summary(out), flush=True)
    finally:
        if world > 1:
            dist.destroy_process_group()


def main(argv=None) -> int:
    from unigen.version import add_version_argument

    parser = argparse.ArgumentParser(prog="python -m unigen.data.prepare",
                                     description="From the public releases to the training files.")
    add_version_argument(parser, parser.prog)
    sub = parser.add_subparsers(dest="command", required=True)
    wm = sub.add_parser("wikimatrix", help="English with IGLUE's languages, thresholded, "
                                           "deduplicated, sharded")
    wm.add_argument("inputs", nargs="+", help="WikiMatrix.<l1>-<l2>.tsv.gz files or folders")
    wm.add_argument("--out", required=True, help="output folder (data.wikimatrix)")
    wm.add_argument("--min-score", type=float, default=1.04, help="margin threshold (CCLM: 1.04)")
    wm.add_argument("--languages", default=",".join(IGLUE_LANGUAGES),
                    help="comma-separated languages paired with English")
    wm.add_argument("--shard-lines", type=int, default=500_000)
    cc = sub.add_parser("cc3m-check", help="is an img2dataset webdataset folder complete?")
    cc.add_argument("folder")
    c6 = sub.add_parser("cc6l", help="UC2's or CCLM's translated CC3M captions → CC6L lines "
                                     "keyed to an img2dataset download")
    c6.add_argument("inputs", nargs="+", help="the release's caption files or folders")
    c6.add_argument("--images", required=True,
                    help="the img2dataset output folder (its NNNNN.parquet give url → key)")
    c6.add_argument("--out", required=True, help="output JSON-lines file (data.cc6l)")
    c6.add_argument("--source", choices=("uc2", "cclm"), default="uc2",
                    help="the release's format (default: uc2)")
    c6.add_argument("--lang", default=None, help="language of a single UC2 file whose name "
                                                  "does not say it")
    c6.add_argument("--url-field", default="url", help="CCLM: the field holding the image URL")
    fe = sub.add_parser("image-features", help="the frozen ViT over every image of a training "
                                               "config's image sources, once: a feature store")
    fe.add_argument("config", help="a pre-training or IGLUE fine-tuning config file")
    fe.add_argument("--out", default=None,
                    help="the store's folder (default: the config's data.image_features)")
    fe.add_argument("--dtype", choices=("bf16", "fp8", "fp32"), default="bf16",
                    help="bf16 (526 KB per ViT-L/14 image), fp8 e4m3 with a per-image scale "
                         "(half), fp32 (exact for an fp32 ViT; double)")
    fe.add_argument("--views", type=int, default=1,
                    help="RandomResizedCrop views per image, one per epoch (needs "
                         "data.random_resized_crop in the config; default 1)")
    fe.add_argument("--crop-seed", type=int, default=0, help="seeds the views' crop boxes")
    fe.add_argument("--batch-size", type=int, default=64, help="images per ViT call")
    fe.add_argument("--images-per-file", type=int, default=512,
                    help="images per feature file (one file ≈ this × views × bytes per view)")
    fe.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                    help="loader processes decoding images (per process)")
    fe.add_argument("--device", default="auto",
                    help="auto (cuda:LOCAL_RANK when there is a GPU, else cpu), cpu, cuda:N")
    args = parser.parse_args(argv)
    try:
        if args.command == "wikimatrix":
            report = prepare_wikimatrix(args.inputs, args.out, min_score=args.min_score,
                                        languages=tuple(args.languages.split(",")),
                                        shard_lines=args.shard_lines)
            print(f"wikimatrix: {sum(r['kept'] for r in report.values())} pairs in "
                  f"{len(report)} language pairs → {args.out}")
        elif args.command == "image-features":
            _image_features(args)
        elif args.command == "cc6l":
            prepare_cc6l(args.inputs, args.images, args.out, source=args.source, lang=args.lang,
                         url_field=args.url_field)
        else:
            r = check_img2dataset_folder(args.folder)
            print(f"cc3m-check: {args.folder} complete: {r['shards']} shards, {r['samples']} "
                  f"samples")
    except (DataFormatError, FileNotFoundError, ValueError, OSError, ImportError) as exc:
        message = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        print(f"unigen.data.prepare: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
