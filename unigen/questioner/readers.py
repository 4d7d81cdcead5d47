"""Read captions, with a stable key each, from text, TSV, JSON-lines or webdataset shards.

Keys are what the data pipeline joins QA pairs on, so they must match the image keys:

- webdataset shards: the sample key of each ``KEY.txt`` member (webdataset's own rule: the member
  path up to the first dot of its file name);
- JSON lines: the ``key`` field when present, else the derived key below;
- text and TSV (CC3M ships ``caption<TAB>url``): ``{index:09d}``, the 0-based line number counted
  over all given files in order. That is the key img2dataset gives the n-th row of CC3M with its
  default 10,000 samples per shard (5-digit shard id + 4-digit index), so QA and images line up.

A line that cannot be used (blank, undecodable, bad JSON, no caption, too long) becomes a
``BadRecord`` and still consumes its index, so one bad line never shifts the keys after it.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import QuestionerError, UsageError
from .prompt import TAGS

FORMATS = ("text", "tsv", "jsonl", "wds")

# webdataset's split of a member path into (key, extension): extension starts at the first dot
# of the file name, directories stay part of the key.
_WDS_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


@dataclass(frozen=True)
class CaptionRecord:
    key: str
    caption: str


@dataclass(frozen=True)
class BadRecord:
    key: str  # the key the line would have had: sharding counts each bad line in one shard only
    where: str  # "file:line" or "shard:member", for the log
    reason: str


def detect_format(path: str | Path) -> str:
    name = str(path).lower()
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "wds"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    return "text"


def check_readable(paths: list[Path]) -> None:
    """Fail before any work starts if an input is missing or unreadable."""
    if not paths:
        raise UsageError("--captions: no input files given (or no file matched the pattern)")
    for path in paths:
        if path.is_dir():
            raise UsageError(f"--captions: {path} is a directory; pass the files in it")
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"--captions: cannot read {path}: {exc.strerror or exc}") from exc


@dataclass
class CaptionReader:
    """Iterates ``CaptionRecord`` / ``BadRecord`` over all inputs, in order."""

    paths: list[Path]
    input_format: str = "auto"
    caption_field: str = "caption"
    key_field: str = "key"
    text_ext: str = "txt"
    max_caption_chars: int = 1000

    def __post_init__(self):
        if self.input_format != "auto" and self.input_format not in FORMATS:
            raise UsageError(f"--input-format must be auto or one of {', '.join(FORMATS)}, got {self.input_format!r}")
        if self.max_caption_chars < 1:
            raise UsageError(f"--max-caption-chars must be positive, got {self.max_caption_chars}")
        self.paths = [Path(p) for p in self.paths]

    def format_of(self, path: Path) -> str:
        return detect_format(path) if self.input_format == "auto" else self.input_format

    def __iter__(self) -> Iterator[CaptionRecord | BadRecord]:
        index = 0  # global line index for derived keys
        for path in self.paths:
            fmt = self.format_of(path)
            if fmt == "wds":
                yield from self._read_wds(path)
                continue
            for lineno, raw in self._lines(path):
                yield self._parse_line(fmt, raw, index, f"{path}:{lineno}")
                index += 1

    def count_lines(self) -> int | None:
        """Number of records for the progress bar (None when a shard would have to be unpacked)."""
        total = 0
        for path in self.paths:
            if self.format_of(path) == "wds":
                return None
            with open(path, "rb") as f:
                last = b"\n"
                while chunk := f.read(1 << 20):
                    total += chunk.count(b"\n")
                    last = chunk[-1:]
                total += last != b"\n"  # a final line without newline is a line too
        return total

    # -- line formats ----------------------------------------------------------------------

    @staticmethod
    def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
        try:
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]  # a UTF-8 byte-order mark is not part of the first caption
                    yield lineno, raw.rstrip(b"\r\n")
        except OSError as exc:
            raise QuestionerError(f"--captions: error while reading {path}: {exc.strerror or exc}") from exc

    def _parse_line(self, fmt: str, raw: bytes, index: int, where: str) -> CaptionRecord | BadRecord:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            return BadRecord(f"{index:09d}", where, "undecodable")
        key = f"{index:09d}"
        if fmt == "text":
            caption = line
        elif fmt == "tsv":
            caption = line.split("\t", 1)[0]
        else:
            if not line.strip():
                return BadRecord(key, where, "empty_caption")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return BadRecord(key, where, "invalid_json")
            if not isinstance(obj, dict) or not isinstance(obj.get(self.caption_field), str):
                return BadRecord(key, where, "missing_caption")
            caption = obj[self.caption_field]
            if self.key_field in obj:
                raw_key = obj[self.key_field]
                # bool is an int subclass, but a true/false key is a data error, not a key.
                if isinstance(raw_key, bool) or not isinstance(raw_key, (str, int)) or not str(raw_key).strip():
                    return BadRecord(key, where, "invalid_key")
                key = str(raw_key).strip()
        return self._validate(key, caption, where)

    # -- webdataset ------------------------------------------------------------------------

    def _read_wds(self, path: Path) -> Iterator[CaptionRecord | BadRecord]:
        try:
            # Streaming mode ("r|*"): one sequential pass, no member index held in memory.
            with tarfile.open(path, "r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    m = _WDS_KEY.match(member.name)
                    if m is None or m.group(2) != self.text_ext:
                        continue
                    where = f"{path}:{member.name}"
                    data = tar.extractfile(member).read()
                    try:
                        caption = data.decode("utf-8")
                    except UnicodeDecodeError:
                        yield BadRecord(m.group(1), where, "undecodable")
                        continue
                    yield self._validate(m.group(1), caption, where)
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise QuestionerError(f"--captions: {path} is not a readable tar shard: {exc}") from exc

    # -- shared checks ---------------------------------------------------------------------

    def _validate(self, key: str, caption: str, where: str) -> CaptionRecord | BadRecord:
        caption = " ".join(caption.split())  # one line, single spaces: captions go into a prompt
        if not caption:
            return BadRecord(key, where, "empty_caption")
        if "\n" in key or "\r" in key:
            return BadRecord(key, where, "invalid_key")
        if len(caption) > self.max_caption_chars:
            return BadRecord(key, where, "caption_too_long")
        if any(tag in caption for tag in TAGS):
            # A caption holding <question>/<answer> tags would corrupt its own prompt.
            return BadRecord(key, where, "caption_has_tag")
        return CaptionRecord(key, caption)
