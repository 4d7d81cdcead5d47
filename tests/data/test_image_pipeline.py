import numpy as np
import pytest
import torch
from data_test_helpers import jpeg_bytes, smooth_image, write_tar

from unigen.data import (
    CLIP_MEAN,
    CLIP_STD,
    ImageSpec,
    PilImageDecoder,
    PilImageTransform,
    WebdatasetImageTextStream,
    dali_available,
    make_image_decoder,
)
from unigen.data.image_pipeline import decode_rgb_pil

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
# one uint8 step in the normalised space (the smallest std gives the largest step)
STEP = 1.0 / 255.0 / min(CLIP_STD)


def test_pil_transform_is_clip_normalisation_of_the_decoded_pixels():
    data = jpeg_bytes(smooth_image(224, 3))
    x = PilImageTransform()(data)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    rgb = decode_rgb_pil(data).astype(np.float64) / 255.0
    for c in range(3):
        expect = (rgb[..., c] - CLIP_MEAN[c]) / CLIP_STD[c]
        np.testing.assert_allclose(x[c].numpy(), expect, atol=1e-5)


def test_pil_resizes_to_the_square_model_input():
    x = PilImageTransform(ImageSpec(size=40))(jpeg_bytes(smooth_image(64, 0)[:, :50]))
    assert x.shape == (3, 40, 40)
    with pytest.raises(ValueError, match="interpolation"):
        ImageSpec(interpolation="nearest")


def test_pil_decoder_drops_corrupt_images():
    good = jpeg_bytes(smooth_image(32, 0))
    images, ok = PilImageDecoder(ImageSpec(size=32)).decode([good, b"junk", good])
    assert ok == [0, 2] and images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="at least one image"):
        PilImageDecoder().decode([])
    with pytest.raises(ValueError, match="image backend"):
        make_image_decoder("opencv")


def _smooth(size):
    return [jpeg_bytes(smooth_image(size, s)) for s in range(3)]


def _world(size):
    from unigen.data.synthetic_world import encode_jpeg, render, sample_scene

    rng = np.random.default_rng(0)
    return [encode_jpeg(render(sample_scene(rng), rng, size)) for _ in range(3)]


@needs_dali
@pytest.mark.parametrize("images, interpolation, max_steps", [
    (lambda: _smooth(224), "bilinear", 0),   # at the target size: identical decoders
    (lambda: _smooth(224), "bicubic", 0),
    (lambda: _smooth(64), "bilinear", 1),    # upscaling: fixed-point rounding only
    (lambda: _smooth(300), "bilinear", 1),   # antialiased downscaling
    (lambda: _world(64), "bilinear", 1),     # sharp edges of the synthetic world
    (lambda: _world(64), "bicubic", 8),      # PIL's and DALI's cubic kernels differ at edges
])
def test_dali_cpu_decoder_matches_pil(images, interpolation, max_steps):
    from unigen.data import DaliImageDecoder

    spec = ImageSpec(size=224, interpolation=interpolation)
    data = images()
    dali, ok = DaliImageDecoder(spec, max_batch_size=4, device="cpu").decode(data)
    pil, _ = PilImageDecoder(spec).decode(data)
    assert ok == [0, 1, 2] and dali.shape == pil.shape == (3, 3, 224, 224)
    diff = (dali - pil).abs()
    assert diff.max().item() <= max_steps * STEP + 1e-4
    assert diff.mean().item() <= 0.3 * STEP


@needs_dali
def test_dali_decoder_skips_a_corrupt_image_in_the_batch(capfd):
    from unigen.data import DaliImageDecoder

    good = jpeg_bytes(smooth_image(64, 1))
    dec = DaliImageDecoder(ImageSpec(size=64), max_batch_size=2, device="cpu")
    images, ok = dec.decode([good, b"\xff\xd8\xff\xe0 broken" * 8, good])
    assert ok == [0, 2] and images.shape == (2, 3, 64, 64)
    # DALI's own line about it names no file: held back (the loader reports the image by name)
    assert "jpeg_parser" not in capfd.readouterr().err
    again, ok2 = dec.decode([good])  # the decoder is still usable afterwards
    assert ok2 == [0] and torch.equal(again[0], images[0])


@needs_dali
def test_dali_webdataset_reader_matches_the_python_reader_and_pil(tmp_path):
    from unigen.data import DaliWebdatasetLoader

    shards = []
    for s in range(2):
        members = []
        for i in range(5):
            key = f"{s}{i:04d}"
            members += [(f"{key}.jpg", jpeg_bytes(smooth_image(224, 10 * s + i))),
                        (f"{key}.txt", f"caption {key}".encode()),
                        (f"{key}.json", b"{}")]
        shards.append(write_tar(tmp_path / f"{s:05d}.tar", members))
    reference = {x["key"]: x for x in WebdatasetImageTextStream(
        shards, image_transform=PilImageTransform())}
    seen = []
    for shard_id in range(2):
        loader = DaliWebdatasetLoader(shards, batch_size=3, shard_id=shard_id, num_shards=2,
                                      device="cpu")
        assert all(p.endswith(".idx") for p in loader.index_paths)  # written when missing
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 224, 224)
            for key, cap, img in zip(batch["key"], batch["caption"], batch["image"]):
                assert cap == reference[key]["caption"]
                # already at the target size: exact
                assert (img - reference[key]["image"]).abs().max().item() <= 1e-4
                seen.append(key)
    assert sorted(seen) == sorted(reference)  # the two DALI shards: no overlap, no loss
    # clean epochs: the next epoch of shard 0 is all of shard 1's samples (DALI's rotation)
    loader = DaliWebdatasetLoader(shards, batch_size=3, shard_id=0, num_shards=2, device="cpu")
    first = [k for b in loader for k in b["key"]]
    second = [k for b in loader for k in b["key"]]
    assert len(first) == len(second) == 5 and sorted(first + second) == sorted(reference)


@needs_dali
@pytest.mark.gpu
def test_dali_gpu_decoder_matches_pil_on_smooth_images():
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: compare on smooth images at
    # the target size, where only decoder rounding can differ, and allow a few uint8 steps.
    from unigen.data import DaliImageDecoder

    spec = ImageSpec(size=224)
    data = _smooth(224)
    gpu, ok = DaliImageDecoder(spec, device="gpu").decode(data)
    pil, _ = PilImageDecoder(spec).decode(data)
    assert gpu.is_cuda and ok == [0, 1, 2]
    diff = (gpu.cpu() - pil).abs()
    assert diff.max().item() <= 4 * STEP + 1e-4 and diff.mean().item() <= 0.5 * STEP


def test_random_resized_crop_boxes_follow_the_rule():
    import numpy as np

    from unigen.data.image_pipeline import random_crop_box

    rng = np.random.default_rng(0)
    fractions = []
    for _ in range(400):
        top, left, h, w = random_crop_box(60, 80, (0.5, 1.0), rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        if (h, w) != (60, 80):  # the fallback is the whole image
            assert 0.70 <= w / h <= 1.40  # 3/4..4/3, up to rounding
            fractions.append(h * w / (60 * 80))
    assert min(fractions) >= 0.48 and max(fractions) <= 1.0 and len(fractions) > 300
    assert np.std(fractions) > 0.1  # crops of many sizes, not one


def test_pil_crop_decodes_to_the_target_and_varies():
    from unigen.data.image_pipeline import PilImageDecoder

    data = jpeg_bytes(smooth_image(64, 3))
    dec = PilImageDecoder(ImageSpec(size=32, interpolation="bicubic", crop_scale=(0.5, 1.0), seed=1))
    a, ok = dec.decode([data, data])
    assert ok == [0, 1] and a.shape == (2, 3, 32, 32)
    assert not torch.equal(a[0], a[1])  # two draws, two crops of one image
    whole = PilImageDecoder(ImageSpec(size=32, interpolation="bicubic")).decode([data])[0]
    again = PilImageDecoder(ImageSpec(size=32, interpolation="bicubic")).decode([data])[0]
    assert torch.equal(whole, again)  # without the crop the resize is deterministic
    same_seed = PilImageDecoder(ImageSpec(size=32, interpolation="bicubic", crop_scale=(0.5, 1.0),
                                          seed=1)).decode([data, data])[0]
    assert torch.equal(same_seed, a)
    with pytest.raises(ValueError, match="crop_scale"):
        ImageSpec(crop_scale=(0.0, 1.0))


@needs_dali
def test_dali_random_resized_crop_runs_at_the_target_size():
    from unigen.data import DaliImageDecoder

    data = jpeg_bytes(smooth_image(64, 2))
    dec = DaliImageDecoder(ImageSpec(size=32, interpolation="bicubic", crop_scale=(0.5, 1.0)),
                           device="cpu", max_batch_size=4)
    out, ok = dec.decode([data] * 4)
    assert ok == [0, 1, 2, 3] and out.shape == (4, 3, 32, 32)
    assert not all(torch.equal(out[0], out[i]) for i in range(1, 4))
