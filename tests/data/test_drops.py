"""Dropped samples: reported once each with where the image is, counted, and a stop past the
limit (:mod:`unigen.data.drops`); the collate names the dropped samples' shard and key."""

import pytest
import torch
from data_test_helpers import jpeg_bytes, smooth_image

from unigen.data import ImageSpec, PilImageDecoder
from unigen.data.collate import collate_task_batch, decode_batch_images
from unigen.data.drops import DroppedSampleMonitor, TooManyDroppedSamples


def test_each_dropped_image_is_reported_once_and_counted():
    lines = []
    m = DroppedSampleMonitor(0.5, min_samples=10, report=lines.append)
    m.update(kept=6, kept_images=4, dropped_samples=["a.tar[k1]"])
    m.update(kept=6, kept_images=5, dropped_samples=["a.tar[k1]", "b.tar[k2]"])
    assert (m.drawn, m.dropped) == (12, 3)  # image samples only: the text-only ones never drop
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == ["a.tar[k1]", "b.tar[k2]"]
    assert lines[1].endswith("(3 of 12 image samples dropped so far)")
    state = m.state_dict()
    again = DroppedSampleMonitor(0.5, min_samples=10, report=lines.append)
    again.load_state_dict(state)
    assert (again.drawn, again.dropped) == (12, 3)


def test_the_limit_applies_from_min_samples_and_an_empty_batch_stops_at_once():
    m = DroppedSampleMonitor(0.2, min_samples=10, report=lambda line: None)
    m.update(kept=3, kept_images=1, dropped_samples=["x"] * 4)  # 80% of 5, but fewer than 10
    with pytest.raises(TooManyDroppedSamples, match=r"8 of the 10 image samples .* \(80.0%\).*"
                                                     r"data.max_dropped_fraction = 20.0%"):
        m.update(kept=4, kept_images=1, dropped_samples=["y"] * 4)
    with pytest.raises(TooManyDroppedSamples, match=r"every sample of a batch was dropped \(2: the "
                                                     r"images of s.tar\[a\], s.tar\[b\] do not decode"):
        DroppedSampleMonitor(1.0).update(kept=0, kept_images=0, dropped_samples=["s.tar[a]", "s.tar[b]"])
    with pytest.raises(ValueError, match="max_fraction"):
        DroppedSampleMonitor(1.5)


def _sample(i, image, origin):
    return {"task": "cap", "key": f"k{i}", "encoder_ids": [0, 2], "target_ids": [5, 6, 1],
            "image": image, "image_origin": origin}


@pytest.mark.parametrize("decode_in", ["collate", "main_process"])
def test_the_collate_names_the_dropped_samples(decode_in):
    good = jpeg_bytes(smooth_image(32, 1))
    samples = [_sample(0, good, "s0.tar[k0]"), _sample(1, b"\xff\xd8 broken", "s0.tar[k1]"),
               _sample(2, good, "s1.tar[k2]")]
    decoder = PilImageDecoder(ImageSpec(size=32))
    if decode_in == "collate":
        out = collate_task_batch(samples, encoder_pad_id=1, decoder_pad_id=0,
                                 image_decoder=decoder)
    else:  # DALI's path: the worker leaves the images encoded, the main process decodes
        out = collate_task_batch(samples, encoder_pad_id=1, decoder_pad_id=0)
        assert out["dropped"] == 0 and out["cap"]["origin"] == ["s0.tar[k0]", "s0.tar[k1]",
                                                                "s1.tar[k2]"]
        out = decode_batch_images(out, decoder, encoder_pad_id=1, decoder_pad_id=0)
    assert out["dropped"] == 1 and out["dropped_samples"] == ["s0.tar[k1]"]
    assert out["cap"]["key"] == ["k0", "k2"] and out["cap"]["origin"] == ["s0.tar[k0]", "s1.tar[k2]"]
    assert isinstance(out["cap"]["images"], torch.Tensor) and out["cap"]["images"].shape[0] == 2
