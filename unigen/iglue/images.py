"""IGLUE's images: names resolved under an image root, never silently wrong, and loaded as the
model's input.

Where a record's images are found below the root:

* MaRVL records (they carry ``language`` and ``concept``): the release's layout,
  ``<root>/<language>/images/<concept>/<file>``. File names repeat across languages (``7-8.jpg``
  is in every language's folder, with other pictures), so no search outside the record's own
  concept folder is made. Folder and file names are compared after Unicode normalisation
  (NFKC): a Tamil or Chinese concept folder may sit on disk in another form (NFD, NFKD) than
  the annotation's ``concept``.
* WIT records: a file whose stem is the ``wit_ix`` (any image extension), else a file named as
  the decoded last part of ``image_url``.
* every other name (XVNLI, xGQA, NLVR2, xFlickr&CO): as written below the root, else as a file
  of that name anywhere below it (NLVR2 spreads its images over numbered folders).

A name that matches more than one file is an error naming the candidates, never a pick; a name
that matches none names where it was looked for. :meth:`ImageResolver.check` resolves a whole
file before any work, and an image that does not decode stops the run naming the file: a test
set is never shrunk silently.

MaRVL/NLVR2's two images are, by default, put side by side into one (left | right, each scaled
to the left one's height), since UniGen's image encoder takes one image at 224×224, the
statements speak of "the left/right image", and the decoder then reads one 32-query prefix, the
layout it was pre-trained on; ``pair_images="two_prefixes"`` keeps them apart instead (each at
full resolution, E_v(left) ⊕ E_v(right) in the model).
"""

from __future__ import annotations

import os
import unicodedata
from collections import defaultdict
from urllib.parse import unquote, urlparse

from unigen.data.image_pipeline import IMAGE_FILE_EXTENSIONS

from .readers import IGLUERecord

# Extensions a WIT image may carry in a release named by wit_ix (lower-cased).
IMAGE_EXTENSIONS = IMAGE_FILE_EXTENSIONS


def _key(name: str) -> str:
    """Names compared across Unicode normalisation forms (NFC/NFD/NFKC/NFKD agree on NFKC)."""
    return unicodedata.normalize("NFKC", name)


class AmbiguousImageError(ValueError):
    """An image name that matches more than one file below the root."""


class ImageResolver:
    """Finds IGLUE images under ``root`` and loads them as RGB PIL images."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageResolver: image root {self.root!r} is not a directory")
        self._by_name: dict[str, list[str]] | None = None
        self._by_stem: dict[str, list[str]] | None = None
        self._listings: dict[str, dict[str, list[str]]] = {}

    # ---- indexes --------------------------------------------------------------------------
    def _walk(self) -> None:
        """One walk below the root, only when some name is not where it says."""
        by_name, by_stem = defaultdict(list), defaultdict(list)
        for folder, _, files in os.walk(self.root):
            for f in files:
                path = os.path.join(folder, f)
                by_name[_key(f)].append(path)
                stem, ext = os.path.splitext(f)
                if ext.lower() in IMAGE_EXTENSIONS:
                    by_stem[_key(stem)].append(path)
        self._by_name, self._by_stem = dict(by_name), dict(by_stem)

    def _listing(self, folder: str) -> dict[str, list[str]]:
        """normalised name → the entries of ``folder`` that have it."""
        if folder not in self._listings:
            entries = defaultdict(list)
            for e in os.listdir(folder):
                entries[_key(e)].append(e)
            self._listings[folder] = dict(entries)
        return self._listings[folder]

    def _child(self, folder: str, name: str, what: str, record_hint: str) -> str | None:
        """``folder/name`` compared under normalisation; None when absent."""
        if not os.path.isdir(folder):
            return None
        found = self._listing(folder).get(_key(name), [])
        if len(found) > 1:
            raise AmbiguousImageError(
                f"{record_hint}: {what} {name!r} matches {len(found)} entries of {folder!r} that "
                f"differ only in Unicode normalisation: {sorted(found)}")
        return os.path.join(folder, found[0]) if found else None

    @staticmethod
    def _one(name: str, found: list[str], where: str) -> str | None:
        if len(found) > 1:
            shown = ", ".join(repr(p) for p in sorted(found)[:10])
            raise AmbiguousImageError(f"image {name!r} matches {len(found)} files below "
                                      f"{where!r}: {shown}{' ...' if len(found) > 10 else ''}; "
                                      f"point the image root at one of their folders")
        return found[0] if found else None

    # ---- resolution -----------------------------------------------------------------------
    def path(self, name: str) -> str:
        """A plain name: as written below the root, else the one file of that name below it."""
        direct = os.path.join(self.root, name)
        if os.path.isfile(direct):
            return direct
        if self._by_name is None:
            self._walk()
        found = self._one(name, self._by_name.get(_key(os.path.basename(name)), []), self.root)
        if found is None:
            raise FileNotFoundError(f"image {name!r} is neither at {direct!r} nor anywhere under "
                                    f"{self.root!r}")
        return found

    def _marvl_path(self, record: IGLUERecord, name: str, hint: str) -> str:
        file = os.path.basename(name)  # few-shot files write "<concept>/<file>"
        folder = self.root
        for what, part in (("language folder", record.language), ("images folder", "images"),
                           ("concept folder", record.concept), ("file", file)):
            found = self._child(folder, part, what, hint)
            if found is None or (what == "file" and not os.path.isfile(found)):
                expected = os.path.join(self.root, record.language, "images", record.concept,
                                        file)
                raise FileNotFoundError(
                    f"{hint}: MaRVL image {file!r} not found: no {what} {part!r} in {folder!r} "
                    f"(expected {expected!r}: MaRVL's release layout is "
                    f"<root>/<language>/images/<concept>/<file>)")
            folder = found
        return folder

    def _wit_path(self, record: IGLUERecord, hint: str) -> str:
        if self._by_name is None:
            self._walk()
        ix = record.uid
        found = self._one(ix, self._by_stem.get(_key(ix), []), self.root)
        if found is not None:
            return found
        url_name = unquote(os.path.basename(urlparse(record.image_url or "").path))
        found = self._one(url_name, self._by_name.get(_key(url_name), []), self.root) \
            if url_name else None
        if found is None:
            raise FileNotFoundError(f"{hint}: WIT image {ix!r} not found under {self.root!r}: "
                                    f"no file named {ix}.<image extension> nor {url_name!r} (the "
                                    f"decoded file name of its image_url)")
        return found

    def paths(self, record: IGLUERecord, where: str = "") -> tuple[str, ...]:
        """The files of ``record``'s images (``where`` prefixes errors: file and line)."""
        hint = where or f"record {record.uid}"
        if record.image_url is not None:
            return (self._wit_path(record, hint),)
        if record.concept is not None:
            return tuple(self._marvl_path(record, n, hint) for n in record.images)
        out = []
        for n in record.images:
            try:
                out.append(self.path(n))
            except (FileNotFoundError, AmbiguousImageError) as e:
                raise type(e)(f"{hint}: {e}") from None
        return tuple(out)

    def check(self, path: str, records: list[IGLUERecord]) -> list[tuple[str, ...]]:
        """Every record's image files, resolved before any work; the first failure names the
        annotation file and line (and how many others fail)."""
        out, failures = [], []
        for rec in records:
            try:
                out.append(self.paths(rec, f"{path}:{rec.line}" if rec.line else path))
            except (FileNotFoundError, AmbiguousImageError) as e:
                failures.append(e)
        if failures:
            more = f" (and {len(failures) - 1} more records with unresolved images)" \
                if len(failures) > 1 else ""
            raise type(failures[0])(f"{failures[0]}{more}")
        return out

    # ---- loading --------------------------------------------------------------------------
    @staticmethod
    def open_rgb(path: str):
        """One RGB image; a file that does not decode stops the run naming it."""
        from PIL import Image

        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"image {path!r} cannot be decoded ({e})") from None

    @staticmethod
    def side_by_side(images):
        """Images pasted left to right, each scaled to the first one's height."""
        from PIL import Image

        if len(images) == 1:
            return images[0]
        height = images[0].height
        scaled = [im if im.height == height else
                  im.resize((max(1, round(im.width * height / im.height)), height), Image.BICUBIC)
                  for im in images]
        canvas = Image.new("RGB", (sum(im.width for im in scaled), height))
        x = 0
        for im in scaled:
            canvas.paste(im, (x, 0))
            x += im.width
        return canvas

    def load(self, names: tuple[str, ...]):
        """The image of plain ``names``; several are put side by side, left to right."""
        return self.side_by_side([self.open_rgb(self.path(n)) for n in names])

    @staticmethod
    def to_tensor(image, size: int):
        """A PIL image resized to size × size: uint8 [3, S, S]."""
        import numpy as np
        import torch
        from PIL import Image

        im = image.resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)

    def tensor(self, names: tuple[str, ...], size: int):
        """The image of plain ``names`` (see :meth:`load`) as uint8 [3, S, S]."""
        return self.to_tensor(self.load(names), size)

    def files_tensor(self, files: tuple[str, ...], size: int):
        """The image of resolved ``files`` side by side, as uint8 [3, S, S]."""
        return self.to_tensor(self.side_by_side([self.open_rgb(f) for f in files]), size)


class RecordImages:
    """A map-style dataset: item i is record i's image as uint8 [3, S, S], or with
    ``pair_images="two_prefixes"`` its two images as [2, 3, S, S] (DataLoader workers decode and
    resize; the model only normalises). The files are resolved when it is built."""

    def __init__(self, records: list[IGLUERecord], resolver: ImageResolver, size: int,
                 path: str = "", pair_images: str = "side_by_side"):
        self.records, self.resolver, self.size = records, resolver, size
        self.pair_images = pair_images
        self.files = resolver.check(path, records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        files = self.files[i]
        if self.pair_images == "two_prefixes" and len(files) == 2:
            import torch

            return torch.stack([self.resolver.files_tensor((f,), self.size) for f in files])
        return self.resolver.files_tensor(files, self.size)
