"""Errors and skip accounting shared by every data source.

Two kinds of bad input are told apart on purpose:

* a *malformed file* (a line that is not JSON, a tsv row with the wrong number of columns, a
  tar archive that cannot be read) is a problem with how the data set was written; it raises
  :class:`DataFormatError` naming the file and the line (or tar member) so it can be fixed;
* a *corrupt sample* (an image that does not decode, an empty caption, a QA key whose image is
  missing) is an accident of web-scale data; it is skipped, counted and logged, never a crash
  in the middle of an epoch (the open_clip/webdataset habit of "log and continue").
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("unigen.data")


class DataFormatError(ValueError):
    """A data file does not follow its format; the message names the file and the line."""

    def __init__(self, path: str, line: int | str | None = None, message: str | None = None):
        if message is None and line is None and "\n" in str(path):
            # A DataLoader worker's error reaches the main process as ``DataFormatError(text)``,
            # text being the worker's formatted traceback; keep its last line, our message.
            last = str(path).rstrip().rsplit("\n", 1)[-1]
            super().__init__(last.split(f"{type(self).__name__}: ", 1)[-1])
            self.path, self.line, self.reason = "", None, str(self)
            return
        self.path = str(path)
        self.line = line
        self.reason = "" if message is None else message
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {self.reason}" if message is not None else where)


class CorruptSampleError(Exception):
    """Raised by a parser for one unusable sample; the stream skips it and counts it."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class FilteredSampleError(Exception):
    """Raised by a parser for a well-formed sample a filter drops (e.g. a low margin score);
    counted separately from corrupt samples and not logged."""


@dataclass
class SkipStats:
    """Counts of skipped samples by reason, with rate-limited logging.

    The first ``log_first`` skips are logged one by one, then every ``log_every``-th, so a
    shard full of broken images cannot flood the log of a long run.
    """

    source: str = "data"
    log_first: int = 10
    log_every: int = 1000
    counts: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, where: str, error: CorruptSampleError) -> None:
        self.counts[error.reason] += 1
        n = self.total
        if n <= self.log_first or n % self.log_every == 0:
            logger.warning("[%s] skipped corrupt sample %s (%s); %d skipped so far",
                           self.source, where, error, n)

    def as_dict(self) -> dict[str, int]:
        return dict(self.counts)
