"""Image question answering data (CCQA: QA pairs the LLM questioner drew from CC3M captions,
paper §3.2 and §4.1).

JSON lines as the questioner writes them, joined with the image shards on ``key``::

    {"key": "000000123", "caption": "...", "question": "What is ...?", "answer": "..."}

``caption`` is optional. Each sample:
``{"task": "qus", "key", "image", "question", "answer", "caption", "origin"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import CorruptSampleError, DataFormatError
from .stream import JsonLinesStream
from .webdataset_images import ImageStore


class QAStream(JsonLinesStream):
    """CCQA JSON lines + image shards → question-answering samples (``image_ref``: a
    feature-store run's image references, as for
    :class:`~unigen.data.webdataset_images.WebdatasetImageTextStream`)."""

    name = "ccqa"

    def __init__(self, paths, *, images: ImageStore | Any,
                 image_transform: Callable[[bytes], Any] | None = None,
                 image_ref: Callable[[str, int], Any] | None = None, **kwargs):
        super().__init__(paths, **kwargs)
        self.images = images if isinstance(images, ImageStore) else ImageStore(images)
        self.image_transform = image_transform
        self.image_ref = image_ref

    def _parse(self, unit, location: str) -> dict:
        obj = self.load_object(unit)
        key = self.require_str(obj, "key", unit)
        question = self.require_str(obj, "question", unit).strip()
        answer = self.require_str(obj, "answer", unit).strip()
        caption = obj.get("caption", "")
        if not isinstance(caption, str):
            raise DataFormatError(unit[0], unit[1], f"field 'caption' must be a string, got "
                                                    f"{type(caption).__name__}")
        if not question or not answer:
            raise CorruptSampleError("empty_text", location)
        image = (self.image_ref(self.images.require(key, location), self._epoch)
                 if self.image_ref is not None else
                 self.images.load(key, self.image_transform, location))
        return {"task": "qus", "key": key, "image": image, "question": question,
                "answer": answer, "caption": caption.strip(), "origin": location,
                "image_origin": self.images.origin(key)}
