"""English image–text pairs in webdataset tar shards, as img2dataset writes them for CC3M.

A shard holds, per sample, ``<key>.jpg`` (the image), ``<key>.txt`` (the caption) and
``<key>.json`` (img2dataset's metadata); the members of one sample are consecutive and share the
key (the file name up to its first dot, as webdataset and DALI group them).

Also here: the DALI index format (``wds2idx``'s ``v1.2``: one line per sample listing
``ext offset size name`` for each member), written for shards that lack one so that
``fn.readers.webdataset`` need not scan the archives, and :class:`ImageStore`, the key → image
lookup that the QA and CC6L sources use to join their JSON lines with the images.

Each sample of :class:`WebdatasetImageTextStream`:
``{"task": "cap", "key", "image", "caption", "lang": "en", "meta", "origin"}`` where ``image``
is the encoded bytes, or whatever ``image_transform`` returns for them (a CLIP-normalised
tensor with :class:`~unigen.data.image_pipeline.PilImageTransform`).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .errors import CorruptSampleError, DataFormatError
from .stream import RecordStream, expand_paths

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
INDEX_VERSION = "v1.2"


def split_key(name: str) -> tuple[str, str]:
    """``("dir/000123", "jpg")`` for ``"dir/000123.jpg"``: the key ends at the basename's
    first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def _iter_tar_groups(
        path: str) -> Iterator[tuple[int, str, dict[str, tarfile.TarInfo], tarfile.TarFile]]:
    """(sample number, key, {ext: member}, open archive) for each sample of a shard."""
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFormatError(path, None, f"not a readable tar archive ({exc})") from None
    with tar:
        key, group, n, last = None, {}, 0, "<start>"
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise DataFormatError(path, f"after member {last!r}",
                                      f"corrupt or truncated tar archive ({exc})") from None
            if member is None:
                break
            last = member.name
            if not member.isfile():
                continue
            k, ext = split_key(member.name)
            if not os.path.basename(k):  # hidden files such as '._x' written by macOS tar
                continue
            if k != key:
                if group:
                    yield n, key, group, tar
                    n += 1
                key, group = k, {}
            if ext in group:
                raise DataFormatError(path, f"member {member.name!r}",
                                      f"sample {k!r} has two '.{ext}' members")
            group[ext] = member
        if group:
            yield n, key, group, tar


def _read_member(path: str, tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    try:
        f = tar.extractfile(member)
        data = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataFormatError(path, f"member {member.name!r}", f"cannot read member ({exc})") \
            from None
    if len(data) != member.size:
        raise DataFormatError(path, f"member {member.name!r}",
                              f"truncated: {len(data)} of {member.size} bytes")
    return data


def iter_shard_images(path: str) -> Iterator[tuple[str, bytes | None]]:
    """``(key, encoded image)`` of each sample of a shard in file order (the key without any
    directory part, as the streams give it); None for a sample without an image member."""
    for _, key, group, tar in _iter_tar_groups(path):
        ext = next((e for e in IMAGE_EXTS if e in group), None)
        yield key.rsplit("/", 1)[-1], (None if ext is None else _read_member(path, tar, group[ext]))


def index_path_for(tar_path: str, index_dir: str | None = None) -> str:
    base = os.path.basename(tar_path)
    stem = base[: -len(".tar")] if base.endswith(".tar") else base
    return os.path.join(index_dir or os.path.dirname(tar_path), stem + ".idx")


def write_wds_index(tar_path: str, idx_path: str | None = None) -> str:
    """Write the DALI ``v1.2`` index of an uncompressed tar shard; returns its path."""
    if not tar_path.endswith(".tar"):
        raise DataFormatError(tar_path, None, "DALI reads uncompressed '.tar' shards only")
    idx_path = idx_path or index_path_for(tar_path)
    lines = []
    for _, _, group, _ in _iter_tar_groups(tar_path):
        for m in group.values():
            if any(c.isspace() for c in m.name):
                raise DataFormatError(tar_path, f"member {m.name!r}",
                                      "member names with whitespace cannot be indexed")
        lines.append(" ".join(f"{ext} {m.offset_data} {m.size} {m.name}"
                              for ext, m in group.items()))
    if not lines:
        raise DataFormatError(tar_path, None, "empty webdataset shard (no file members)")
    tmp = idx_path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{INDEX_VERSION} {len(lines)}\n")
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, idx_path)  # atomic: concurrent ranks never read a half-written index
    return idx_path


def read_wds_index(idx_path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """``[(key, {ext: (offset, size)})]`` from a DALI ``v1.2`` index file."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
            raise DataFormatError(idx_path, 1, f"expected header '{INDEX_VERSION} <count>', got "
                                               f"{' '.join(header)!r}")
        out = []
        for lineno, line in enumerate(f, start=2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) % 4:
                raise DataFormatError(idx_path, lineno, "expected groups of 'ext offset size name'")
            comps, key = {}, None
            for i in range(0, len(parts), 4):
                ext, off, size, name = parts[i: i + 4]
                if not (off.isdigit() and size.isdigit()):
                    raise DataFormatError(idx_path, lineno,
                                          f"offset/size not integers: {off} {size}")
                comps[ext] = (int(off), int(size))
                key = split_key(name)[0]
            out.append((key, comps))
        if len(out) != int(header[1]):
            raise DataFormatError(idx_path, None,
                                  f"header says {header[1]} samples, found {len(out)}")
    return out


def ensure_wds_indices(tar_paths: Sequence[str], index_dir: str | None = None) -> list[str]:
    """Index files for the shards, written when missing or older than their shard."""
    out = []
    for tar_path in tar_paths:
        idx = index_path_for(tar_path, index_dir)
        if not os.path.exists(idx) or os.path.getmtime(idx) < os.path.getmtime(tar_path):
            write_wds_index(tar_path, idx)
        out.append(idx)
    return out


def tar_shards(paths) -> list[str]:
    return expand_paths(paths, what="webdataset", patterns=("*.tar", "*.tar.gz", "*.tgz"))


class WebdatasetImageTextStream(RecordStream):
    """img2dataset-style shards → captioning samples (one shard = one file for sharding).

    Args:
        image_transform: applied to the encoded image bytes in the reading process (e.g. the
            PIL decoder); an exception from it skips the sample as corrupt. ``None`` keeps the
            bytes for batched decoding (DALI).
        caption_from: ``"txt"`` (img2dataset's caption file) or ``"json"`` (its ``caption``).
        task: the task name put in each sample (``"cap"``; ``"match"`` when CC3M pairs feed
            image–text matching directly).
        image_ref: a feature-store run's ``(key, epoch) -> reference``
            (:class:`~unigen.data.feature_store.StoredImageRefs`): the sample's image is that
            reference and the image bytes are never read.
    """

    name = "webdataset"
    patterns = ("*.tar", "*.tar.gz", "*.tgz")

    def __init__(self, paths, *, image_transform: Callable[[bytes], Any] | None = None,
                 caption_from: str = "txt", task: str = "cap",
                 image_ref: Callable[[str, int], Any] | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self.task = task
        if caption_from not in ("txt", "json"):
            raise ValueError(f"caption_from must be 'txt' or 'json', got {caption_from!r}")
        self.image_transform = image_transform
        self.caption_from = caption_from
        self.image_ref = image_ref

    def _units(self, path: str):
        for n, key, group, tar in _iter_tar_groups(path):
            yield f"{path}[{n}:{key}]", (path, key, group, tar)

    def _materialise(self, handle):
        path, key, group, tar = handle
        # with stored features the image member's presence is all a sample needs of it
        return path, key, {ext: (None if self.image_ref is not None and ext in IMAGE_EXTS
                                 else _read_member(path, tar, m)) for ext, m in group.items()}

    def _parse(self, unit, location: str) -> dict:
        _, key, parts = unit
        image_ext = next((e for e in IMAGE_EXTS if e in parts), None)
        if image_ext is None:
            # img2dataset keeps failed downloads as json-only samples
            raise CorruptSampleError("missing_image", location)
        meta: dict = {}
        if "json" in parts:
            try:
                meta = json.loads(parts["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise CorruptSampleError("bad_json", f"{location}: {exc}") from None
            if not isinstance(meta, dict):
                raise CorruptSampleError("bad_json", f"{location}: not an object")
        if self.caption_from == "txt":
            if "txt" not in parts:
                raise CorruptSampleError("missing_caption", location)
            try:
                caption = parts["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                raise CorruptSampleError("bad_caption", f"{location}: not utf-8") from None
        else:
            caption = meta.get("caption") or ""
            caption = caption.strip() if isinstance(caption, str) else ""
        if not caption:
            raise CorruptSampleError("missing_caption", location)
        image = parts[image_ext]
        key = key.rsplit("/", 1)[-1]
        if self.image_ref is not None:
            image = self.image_ref(key, self._epoch)
        elif self.image_transform is not None:
            try:
                image = self.image_transform(image)
            except Exception as exc:  # any decoder failure is a corrupt image, never a crash
                raise CorruptSampleError("image_decode", f"{location}: {exc}") from None
        return {"task": self.task, "key": key, "image": image, "caption": caption, "lang": "en",
                "meta": meta, "origin": location, "image_origin": f"{unit[0]}[{key}]"}


class ImageStore:
    """Encoded image bytes by key, read at random from uncompressed shards via their indices.

    Keys are webdataset keys without any directory part; a key present in two shards is an
    error (the joins of QA and CC6L data on the key would be ambiguous). File handles are
    opened lazily per process, so a store can be pickled into DataLoader workers.
    """

    def __init__(self, paths, *, index_dir: str | None = None):
        self.paths = tar_shards(paths)
        for p in self.paths:
            if not p.endswith(".tar"):
                raise DataFormatError(p, None, "ImageStore needs uncompressed '.tar' shards "
                                               "(random access by offset)")
        self.index_paths = ensure_wds_indices(self.paths, index_dir)
        self._where: dict[str, tuple[int, int, int]] = {}
        for si, (tar_path, idx) in enumerate(zip(self.paths, self.index_paths)):
            for key, comps in read_wds_index(idx):
                ext = next((e for e in IMAGE_EXTS if e in comps), None)
                if ext is None:
                    continue
                key = key.rsplit("/", 1)[-1]
                if key in self._where:
                    other = self.paths[self._where[key][0]]
                    raise DataFormatError(tar_path, None, f"key {key!r} also appears in {other}")
                self._where[key] = (si, *comps[ext])
        self._files: dict[int, Any] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self):
        return self._where.keys()

    def __getitem__(self, key: str) -> bytes:
        si, offset, size = self._where[key]
        if self._pid != os.getpid():  # fresh handles after a fork into a worker
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(si)
        if f is None:
            f = self._files[si] = open(self.paths[si], "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise DataFormatError(self.paths[si], f"key {key!r}", "image data past end of file")
        return data

    def origin(self, key: str) -> str:
        """Where the image of ``key`` is, ``"<shard>[<key>]"`` (for logs of dropped samples)."""
        return f"{self.paths[self._where[key][0]]}[{key}]"

    def require(self, key: str, location: str = "") -> str:
        """``key``, or CorruptSampleError when no shard holds its image."""
        if key not in self._where:
            raise CorruptSampleError("missing_image", f"{location}: key {key!r} is in no shard")
        return key

    def load(self, key: str, transform: Callable[[bytes], Any] | None = None,
             location: str = "") -> Any:
        """The image of ``key`` (transformed), or CorruptSampleError when absent/undecodable."""
        data = self[self.require(key, location)]
        if transform is None:
            return data
        try:
            return transform(data)
        except Exception as exc:  # any decoder failure is a corrupt image, never a crash
            raise CorruptSampleError("image_decode", f"{location}: key {key!r}: {exc}") from None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None
        return state
