"""The output file and its ledger: append-only, crash-safe, resumable.

Two files are written side by side:

- ``OUT`` — the CCQA JSON lines ``{"key", "caption", "question", "answer"}``, one per kept pair;
- ``OUT.done.jsonl`` — the ledger: a header line describing the run, then one line per caption
  that has been fully handled, ``{"key", "kept", "rejected": {reason: n}}``, including captions
  whose every pair was rejected (so a restart neither re-asks the LLM about them nor loses their
  counts in the summary).

Each batch is appended to ``OUT`` first, flushed and fsynced, and only then recorded in the
ledger. A run killed at any instant therefore leaves at most one unrecorded batch at the tail of
``OUT`` (possibly ending in a half line) and at most a half line at the tail of the ledger.
``open()`` cuts both tails off, so the restarted run redoes exactly the unrecorded captions: no
duplicate, no missing key. An exclusive ``flock`` on the ledger stops two runs (say, two shards
given the same ``--out`` by mistake) from interleaving writes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

try:  # POSIX only; elsewhere runs are simply not protected against a concurrent writer.
    import fcntl
except ImportError:  # pragma: no cover - not reachable on Linux/macOS
    fcntl = None


def ledger_path(out: Path) -> Path:
    return out.with_name(out.name + ".done.jsonl")


def summary_path(out: Path) -> Path:
    return out.with_name(out.name + ".summary.json")


@dataclass
class Totals:
    """Counts over every caption recorded in the ledger (all runs of this output together)."""

    captions: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    pairs_per_caption: Counter = field(default_factory=Counter)

    def add(self, kept: int, rejected: dict) -> None:
        self.captions += 1
        self.kept += kept
        self.rejected.update(rejected)
        self.pairs_per_caption[kept] += 1


@contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM until the block is done, then deliver them.

    Ctrl-C (or a scheduler's SIGTERM) arriving in the middle of a write would otherwise leave a
    half line; deferred, it lands between batches, where both files are consistent. Only the main
    thread can install handlers; elsewhere the block simply runs (and resume repairs the tail).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum, frame):
        pending.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if pending:
            signal.raise_signal(pending[0])  # now handled by the restored handler


def _truncate_partial_line(f) -> int:
    """Cut a file opened 'r+b' after its last newline; return the new size."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return 0
    # Scan backwards in blocks for the last newline; a half line is at most one record long.
    pos = size
    block = 1 << 16
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            end = start + nl + 1
            if end != size:
                f.truncate(end)
            return end
        pos = start
    f.truncate(0)
    return 0


class OutputStore:
    """Owns ``OUT`` and its ledger for one run."""

    def __init__(self, out: str | Path, *, run_header: dict, overwrite: bool = False):
        self.out = Path(out)
        self.ledger = ledger_path(self.out)
        self.run_header = run_header
        self.overwrite = overwrite
        self.done: set[str] = set()
        self.totals = Totals()
        self.warnings: list[str] = []
        self._out_f = None
        self._ledger_f = None

    # -- opening and repair ----------------------------------------------------------------

    def open(self) -> "OutputStore":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--out: cannot create directory {self.out.parent}: {exc.strerror or exc}") from exc
        if self.out.is_dir():
            raise UsageError(f"--out: {self.out} is a directory")
        if (
            not self.overwrite
            and not self.ledger.exists()
            and self.out.exists()
            and self.out.stat().st_size > 0
        ):
            raise UsageError(
                f"--out: {self.out} exists but has no ledger {self.ledger.name}, so the keys it "
                "holds cannot be trusted for resuming; pass --overwrite to start over or choose another --out"
            )
        try:
            try:
                self._ledger_f = open(self.ledger, "a+b")
                self._lock()
                self._out_f = open(self.out, "a+b")
            except OSError as exc:
                raise UsageError(f"--out: cannot open {self.out} for writing: {exc.strerror or exc}") from exc
            if self.overwrite:
                self._ledger_f.truncate(0)
                self._out_f.truncate(0)
            self._load_ledger()
            self._repair_output()
            if self._ledger_f.tell() == 0:
                self._write_lines(self._ledger_f, [json.dumps({"run": self.run_header}, ensure_ascii=False)])
        except BaseException:
            self.close()  # release the lock: the caller gets an error, not a store
            raise
        return self

    def _lock(self) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(self._ledger_f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise UsageError(
                f"--out: another questioner run is writing {self.out} (its ledger is locked); "
                "give each shard its own --out"
            ) from exc

    def _load_ledger(self) -> None:
        f = self._ledger_f
        _truncate_partial_line(f)
        f.seek(0)
        for lineno, raw in enumerate(f, start=1):
            try:
                rec = json.loads(raw)
                if lineno == 1:
                    self._check_header(rec["run"])
                    continue
                key, kept, rejected = rec["key"], int(rec["kept"]), dict(rec["rejected"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise UsageError(
                    f"ledger {self.ledger} line {lineno} is not a ledger record ({exc}); "
                    "pass --overwrite to start over"
                ) from exc
            self.done.add(key)
            self.totals.add(kept, rejected)
        f.seek(0, os.SEEK_END)

    def _check_header(self, previous: dict) -> None:
        # Mixing shards in one output would silently lose keys; everything else only changes the
        # generator, which is worth a warning, not a refusal (e.g. moving to a bigger batch size).
        if previous.get("shard") != self.run_header.get("shard"):
            raise UsageError(
                f"--shard {self.run_header.get('shard')} does not match shard {previous.get('shard')} "
                f"that {self.out} was started with; use the same --shard or another --out"
            )
        for name in ("backend", "model", "prompt_version"):
            if previous.get(name) != self.run_header.get(name):
                self.warnings.append(
                    f"{self.out} was started with {name}={previous.get(name)!r}, this run uses "
                    f"{self.run_header.get(name)!r}"
                )

    def _repair_output(self) -> None:
        f = self._out_f
        _truncate_partial_line(f)
        f.seek(0)
        keep_until = 0
        offset = 0
        recorded_lines = 0
        tail_keys: set[str] = set()
        for lineno, raw in enumerate(f, start=1):
            offset += len(raw)
            try:
                key = json.loads(raw)["key"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise UsageError(f"--out: {self.out} line {lineno} is not a questioner record") from exc
            if key in self.done:
                keep_until = offset
                recorded_lines += 1
                # A key outside the ledger *before* a recorded one cannot come from an interrupted
                # batch (those are only ever at the tail); keep it and treat it as done.
                self.done.update(tail_keys)
                tail_keys.clear()
            else:
                tail_keys.add(key)
        if recorded_lines < self.totals.kept:
            raise UsageError(
                f"--out: the ledger {self.ledger.name} records {self.totals.kept} pairs but {self.out} "
                f"holds {recorded_lines}; the two files are out of sync (one was replaced or edited), "
                "pass --overwrite to start over"
            )
        if tail_keys:
            # The last batch reached OUT but not the ledger: drop it, it will be generated again.
            f.truncate(keep_until)
        f.seek(0, os.SEEK_END)

    # -- writing ---------------------------------------------------------------------------

    @staticmethod
    def _write_lines(f, lines: list[str]) -> None:
        if not lines:
            return
        # One write of whole lines, then flush + fsync: the data is on disk before the ledger
        # (written after) can claim it.
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())

    def append(self, results: list[tuple[str, str, list[tuple[str, str]], Counter]]) -> None:
        """Record a batch: ``(key, caption, kept pairs, rejection counts)`` per caption."""
        out_lines = []
        ledger_lines = []
        for key, caption, pairs, rejected in results:
            for question, answer in pairs:
                out_lines.append(
                    json.dumps(
                        {"key": key, "caption": caption, "question": question, "answer": answer},
                        ensure_ascii=False,
                    )
                )
            rejected = {k: v for k, v in sorted(rejected.items()) if v}
            ledger_lines.append(
                json.dumps({"key": key, "kept": len(pairs), "rejected": rejected}, ensure_ascii=False)
            )
        # The totals are updated inside the deferred block too: a signal held during the write
        # is delivered after it, and the summary printed then must count this batch.
        with signals_deferred():
            self._write_lines(self._out_f, out_lines)
            self._write_lines(self._ledger_f, ledger_lines)
            for key, _, pairs, rejected in results:
                self.done.add(key)
                self.totals.add(len(pairs), rejected)

    def close(self) -> None:
        for f in (self._out_f, self._ledger_f):
            if f is not None:
                try:
                    f.close()
                except OSError as exc:  # closing is best effort; the data was fsynced already
                    print(f"warning: closing {f.name}: {exc}", file=sys.stderr)
        self._out_f = self._ledger_f = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()
        return False
