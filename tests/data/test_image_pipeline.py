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
def test_dali_decoder_skips_a_corrupt_image_in_the_batch():
    from unigen.data import DaliImageDecoder

    good = jpeg_bytes(smooth_image(64, 1))
    dec = DaliImageDecoder(ImageSpec(size=64), max_batch_size=2, device="cpu")
    images, ok = dec.decode([good, b"\xff\xd8\xff broken", good])
    assert ok == [0, 2] and images.shape == (2, 3, 64, 64)
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
