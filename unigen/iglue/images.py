"""IGLUE's images: names resolved under an image root and loaded as the model's input.

A name is found as written below the root, else as a file of that name anywhere below it (NLVR2
spreads its images over numbered folders). MaRVL/NLVR2's two images are put side by side into
one (left | right), since UniGen's image encoder takes one image; the statements speak of "the
left/right image".
"""

from __future__ import annotations

import os

from .readers import IGLUERecord


class ImageResolver:
    """Finds IGLUE image names under ``root`` and loads them as RGB PIL images."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ImageResolver: image root {self.root!r} is not a directory")
        self._by_name: dict[str, str] | None = None

    def path(self, name: str) -> str:
        direct = os.path.join(self.root, name)
        if os.path.isfile(direct):
            return direct
        if self._by_name is None:  # one walk, only when some name is not where it says
            self._by_name = {}
            for folder, _, files in os.walk(self.root):
                for f in files:
                    self._by_name.setdefault(f, os.path.join(folder, f))
        found = self._by_name.get(os.path.basename(name))
        if found is None:
            raise FileNotFoundError(f"image {name!r} is neither at {direct!r} nor anywhere under "
                                    f"{self.root!r}")
        return found

    def load(self, names: tuple[str, ...]):
        """One RGB image; several names are put side by side (each scaled to the first's
        height), left to right in the given order."""
        from PIL import Image

        images = []
        for name in names:
            with Image.open(self.path(name)) as im:
                images.append(im.convert("RGB"))
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

    def tensor(self, names: tuple[str, ...], size: int):
        """The image of ``names`` (see :meth:`load`) resized to size × size: uint8 [3, S, S]."""
        import numpy as np
        import torch
        from PIL import Image

        im = self.load(names).resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


class RecordImages:
    """A map-style dataset: item i is record i's image as uint8 [3, S, S] (DataLoader workers
    decode and resize; the model only normalises)."""

    def __init__(self, records: list[IGLUERecord], resolver: ImageResolver, size: int):
        self.records, self.resolver, self.size = records, resolver, size

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        return self.resolver.tensor(self.records[i].images, self.size)
