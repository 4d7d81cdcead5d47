"""Samples dropped from training batches (an image that does not decode): each one reported
once with where its image is, counted, and the run stopped when too many are lost.

The loader drops a sample whose image fails to decode rather than crash a long run (the
webdataset habit of "log and continue"); this module keeps that from hiding a broken data set.
"""

from __future__ import annotations

from collections.abc import Callable


class TooManyDroppedSamples(ValueError):
    """More of the batches' samples were dropped than ``data.max_dropped_fraction`` allows, or
    a whole batch was."""


class DroppedSampleMonitor:
    """Counts the image samples one process draws and drops; ``update`` per loader batch.

    ``report(line)`` receives one line per dropped image, the first time it is dropped (an image
    that several tasks or a later epoch draw again is not reported again). Once ``min_samples``
    image samples are drawn, a dropped fraction of them above ``max_fraction`` raises
    :class:`TooManyDroppedSamples`; so does a batch left with no sample at all. Text-only
    samples (translation) cannot be dropped and are not counted. The counts are this
    process's: every rank checks its own stream.
    """

    def __init__(self, max_fraction: float, *, min_samples: int = 100,
                 report: Callable[[str], None] = print):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction!r}")
        self.max_fraction = float(max_fraction)
        self.min_samples = int(min_samples)
        self.report = report
        self.drawn = 0
        self.dropped = 0
        self._reported: set[str] = set()

    def update(self, kept: int, kept_images: int, dropped_samples: list[str]) -> None:
        """One batch: ``kept`` samples left, ``kept_images`` of them with an image, and
        ``dropped_samples``, where the dropped ones' images are (one string per sample)."""
        lost = len(dropped_samples)
        self.drawn += kept_images + lost
        self.dropped += lost
        for where in dropped_samples:
            if where not in self._reported:
                self._reported.add(where)
                self.report(f"dropped a sample whose image does not decode: {where} "
                            f"({self.dropped} of {self.drawn} image samples dropped so far)")
        if lost and kept == 0:
            raise TooManyDroppedSamples(
                f"every sample of a batch was dropped ({lost}: the images of "
                f"{', '.join(dropped_samples[:3])}{', ...' if lost > 3 else ''} do not decode); "
                f"check the image shards (data.image_shards)")
        if self.drawn >= self.min_samples and self.fraction > self.max_fraction:
            raise TooManyDroppedSamples(
                f"{self.dropped} of the {self.drawn} image samples drawn so far were dropped "
                f"({self.fraction:.1%}) because their images do not decode, more than "
                f"data.max_dropped_fraction = {self.max_fraction:.1%}; check the image shards "
                f"(data.image_shards) or raise the limit")

    @property
    def fraction(self) -> float:
        return self.dropped / self.drawn if self.drawn else 0.0

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "dropped": self.dropped}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = int(state.get("drawn", 0))
        self.dropped = int(state.get("dropped", 0))
