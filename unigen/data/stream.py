"""The record stream every source builds on: sharded, shuffled, repeatable and resumable.

A source reads *units* from its files (a text line, a group of tar members sharing a key) and
parses each unit into a sample dict. The order of units is a pure function of
``(seed, epoch, shard)``, so a position is just ``(epoch, consumed)``: the number of units this
shard has taken from its epoch order, parsed or skipped. ``load_state_dict`` replays that many
units without parsing them, which makes resuming exact: the samples after a resume are the
samples an uninterrupted run would have produced.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import IterableDataset

from .errors import CorruptSampleError, DataFormatError, FilteredSampleError, SkipStats
from .sharding import ShardSpec, resolve_shard

SHARD_BY = ("auto", "file", "sample")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike], *, what: str,
                 patterns: Sequence[str]) -> list[str]:
    """Files named by ``paths``: files, directories (searched with ``patterns``) or globs.

    The result is sorted so every rank agrees on the global order.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = [f for pat in patterns for f in glob.glob(os.path.join(p, "**", pat),
                                                                recursive=True)]
            if not found:
                raise FileNotFoundError(
                    f"{what}: directory {p!r} holds no file matching {list(patterns)}")
            out.extend(found)
        elif any(ch in p for ch in "*?["):
            found = glob.glob(p)
            if not found:
                raise FileNotFoundError(f"{what}: pattern {p!r} matches no file")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{what}: no such file or directory {p!r}")
    if not out:
        raise ValueError(f"{what}: no input files given")
    return sorted(set(out))


def iter_text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without newline) of a utf-8 text file, ``.gz`` transparently.

    A truncated gzip stream or a line that is not utf-8 is a malformed file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    yield lineno, raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise DataFormatError(path, lineno, f"not valid utf-8 ({exc})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataFormatError(path, lineno + 1,
                              f"corrupt or truncated gzip stream ({exc})") from None


class RecordStream(IterableDataset):
    """Base class of the data sources (see the module docstring).

    Args:
        paths: files, directories or glob patterns.
        seed: seeds the per-epoch file order and the shuffle buffer.
        shuffle: shuffle the file order each epoch and pass units through a shuffle buffer.
        shuffle_buffer: units held by the buffer (0 keeps the file order within files).
        epochs: passes over the data; ``None`` repeats forever (what task mixing wants).
        shard: an explicit shard; by default it is resolved at iteration time from the rank
            (``rank``/``world_size`` or torch.distributed or torchrun's env) and the worker.
        shard_by: ``"file"`` gives whole files to shards (cheap, needs at least as many files
            as shards), ``"sample"`` deals units round-robin over the global order (exact
            balance, every shard scans every file), ``"auto"`` picks ``"file"`` when there
            are at least as many files as shards.
        strict: a malformed file raises :class:`DataFormatError`; with ``strict=False`` the
            malformed unit is skipped and counted like a corrupt sample.
    """

    #: name used in logs and errors
    name = "records"
    #: patterns searched inside a directory given as a path
    patterns: tuple[str, ...] = ("*",)

    def __init__(self, paths, *, seed: int = 0, shuffle: bool = False, shuffle_buffer: int = 0,
                 epochs: int | None = 1, shard: ShardSpec | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 shard_by: str = "auto", strict: bool = True):
        if shard_by not in SHARD_BY:
            raise ValueError(f"{self.name}: shard_by must be one of {SHARD_BY}, got {shard_by!r}")
        if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
            raise ValueError(f"{self.name}: epochs must be a positive int or None, got {epochs!r}")
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"{self.name}: shuffle_buffer must be an int >= 0, "
                             f"got {shuffle_buffer!r}")
        self.paths = expand_paths(paths, what=self.name, patterns=self.patterns)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.epochs = epochs
        self.shard = shard
        self.rank, self.world_size = rank, world_size
        self.shard_by = shard_by
        self.strict = strict
        self.skipped = SkipStats(source=self.name)
        self.filtered = 0
        self._epoch = 0
        self._consumed = 0

    # -- what a subclass provides ---------------------------------------------------------
    def _units(self, path: str) -> Iterator[tuple[str, Any]]:
        """(location, handle) of every unit of one file, in file order."""
        raise NotImplementedError

    def _materialise(self, handle: Any) -> Any:
        """The unit's data; called only for units of this shard (tar members are read here)."""
        return handle

    def _parse(self, unit: Any, location: str) -> dict:
        """A sample dict, or raise CorruptSampleError (skip) / DataFormatError (malformed)."""
        raise NotImplementedError

    # -- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Position after the last sample handed out: restore it to continue from there."""
        return {"source": self.name, "epoch": self._epoch, "consumed": self._consumed,
                "skipped": self.skipped.as_dict()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("epoch", "consumed"):
            if not isinstance(state.get(key), int) or state[key] < 0:
                raise ValueError(f"{self.name}: state_dict needs a non-negative int {key!r}, "
                                 f"got {state.get(key)!r}")
        self._epoch, self._consumed = state["epoch"], state["consumed"]

    def reset(self) -> None:
        """Back to the start of epoch 0 (iterating again otherwise continues where it stopped)."""
        self._epoch, self._consumed = 0, 0

    def shard_spec(self) -> ShardSpec:
        return self.shard if self.shard is not None else resolve_shard(self.rank, self.world_size)

    # -- the unit order -------------------------------------------------------------------
    def _file_order(self, epoch: int) -> list[str]:
        if not self.shuffle:
            return list(self.paths)
        # the same permutation on every shard: the partition below stays a partition
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        return [self.paths[i] for i in perm]

    def _shard_units(self, epoch: int, shard: ShardSpec) -> Iterator[tuple[str, Any]]:
        order = self._file_order(epoch)
        by_file = self.shard_by == "file" or (self.shard_by == "auto" and len(order) >= shard.count)
        if by_file:
            if len(order) < shard.count:
                raise ValueError(f"{self.name}: shard_by='file' needs at least as many files as "
                                 f"shards ({len(order)} files < {shard.count} shards)")
            for path in order[shard.index::shard.count]:
                for loc, handle in self._units(path):
                    yield loc, self._materialise(handle)
        else:
            i = 0
            for path in order:
                for loc, handle in self._units(path):
                    if i % shard.count == shard.index:
                        yield loc, self._materialise(handle)
                    i += 1

    def _epoch_units(self, epoch: int, shard: ShardSpec) -> Iterator[tuple[str, Any]]:
        units = self._shard_units(epoch, shard)
        if self.shuffle_buffer <= 1:
            yield from units
            return
        # Reservoir-style buffer (as webdataset's shuffle): each unit is swapped with a random
        # held one; seeded per (epoch, shard) so the order is reproducible for resuming.
        rng = np.random.default_rng([self.seed, epoch, shard.index, shard.count, 1])
        buf: list = []
        for item in units:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        for j in rng.permutation(len(buf)):
            yield buf[j]

    def __iter__(self) -> Iterator[dict]:
        shard = self.shard_spec()
        epoch, skip = self._epoch, self._consumed
        while self.epochs is None or epoch < self.epochs:
            n = 0
            for n, (loc, unit) in enumerate(self._epoch_units(epoch, shard), start=1):
                if n <= skip:
                    continue  # replaying a saved position: no parsing, no decoding
                self._epoch, self._consumed = epoch, n
                try:
                    sample = self._parse(unit, loc)
                except FilteredSampleError:
                    self.filtered += 1
                    continue
                except CorruptSampleError as exc:
                    self.skipped.record(loc, exc)
                    continue
                except DataFormatError as exc:
                    if self.strict:
                        raise
                    self.skipped.record(loc, CorruptSampleError("malformed", exc.reason))
                    continue
                yield sample
            if n == 0 and self.epochs is None:
                raise ValueError(f"{self.name}: shard {shard.index}/{shard.count} has no samples "
                                 f"in {len(self.paths)} file(s); an endless stream needs some")
            epoch, skip = epoch + 1, 0
            self._epoch, self._consumed = epoch, 0


class JsonLinesStream(RecordStream):
    """A stream of JSON objects, one per line; blank lines are allowed and skipped silently."""

    patterns = ("*.jsonl", "*.jsonl.gz", "*.json", "*.json.gz")

    def _units(self, path: str) -> Iterator[tuple[str, Any]]:
        for lineno, line in iter_text_lines(path):
            if line.strip():
                yield f"{path}:{lineno}", (path, lineno, line)

    @staticmethod
    def load_object(unit) -> dict:
        import json

        path, lineno, line = unit
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(path, lineno, f"not valid JSON ({exc.msg} at column "
                                                f"{exc.colno})") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, lineno, f"expected a JSON object, got "
                                                f"{type(obj).__name__}")
        return obj

    @staticmethod
    def require_str(obj: dict, key: str, unit) -> str:
        """A string field that must be present (else the file is malformed)."""
        path, lineno, _ = unit
        if key not in obj:
            raise DataFormatError(path, lineno, f"missing field {key!r} (fields: {sorted(obj)})")
        value = obj[key]
        if not isinstance(value, str):
            raise DataFormatError(path, lineno, f"field {key!r} must be a string, got "
                                                f"{type(value).__name__}")
        return value


def take(stream: Iterable[dict], n: int) -> list[dict]:
    """The first ``n`` samples of a stream (fewer if it ends), pulling no sample beyond them."""
    return list(itertools.islice(stream, n))
