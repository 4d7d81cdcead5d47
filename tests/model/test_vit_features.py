"""The frozen ViT's stored output (unigen.model.vit_features): its encodings and their error,
the weights' hash, and UniGen trained from it instead of pixels."""

import dataclasses

import pytest
import torch

from unigen.model.batch import UniGenBatch
from unigen.model.config import UniGenConfig
from unigen.model.image_encoder import build_frozen_clip
from unigen.model.unigen_model import UniGen
from unigen.model.vit_features import (
    FP8_MAX,
    ImageFeatures,
    dequantize,
    encode,
    feature_shape,
    vit_weights_hash,
)


def _features(n=3, tokens=17, width=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # per image another magnitude, and a few outlier channels as CLIP's ViT has
    x = torch.randn(n, tokens, width, generator=g) * torch.logspace(-1, 1, n)[:, None, None]
    x[:, :, 5] *= 20
    return x


def test_fp32_is_exact_and_bf16_rounds_to_nearest():
    x = _features()
    assert torch.equal(encode(x, "fp32").dequantize(), x)
    bf16 = encode(x, "bf16")
    assert bf16.values.dtype == torch.bfloat16 and bf16.scales is None
    assert torch.equal(bf16.dequantize(), x.to(torch.bfloat16).float())
    rel = ((bf16.dequantize() - x).abs() / x.abs().clamp_min(1e-30)).max()
    assert rel <= 2.0 ** -8  # bf16: 8 significant bits, half a step of rounding


def test_fp8_per_image_scale_bounds_the_error():
    x = _features()
    fp8 = encode(x, "fp8")
    assert fp8.values.dtype == torch.float8_e4m3fn and fp8.scales.shape == (3,)
    # each image's largest magnitude lands on e4m3's largest value
    torch.testing.assert_close(fp8.values.float().abs().amax(dim=(1, 2)),
                               torch.full((3,), FP8_MAX))
    err = (fp8.dequantize() - x).abs()
    scaled = x.abs() / fp8.scales[:, None, None]
    normal = scaled >= 2.0 ** -6  # e4m3's smallest normal: 3 mantissa bits above it
    assert (err[normal] / x.abs()[normal]).max() <= 2.0 ** -4
    # below it, subnormals: half a step of 2^-9, times the image's scale
    assert (err[~normal] / fp8.scales[:, None, None].expand_as(x)[~normal]).max() <= 2.0 ** -10
    rel_rms = ((fp8.dequantize() - x).norm() / x.norm()).item()
    assert 0.005 < rel_rms < 0.04  # a real quantisation, not a copy, and not a broken one


def test_fp8_of_an_all_zero_image_keeps_scale_one():
    fp8 = encode(torch.zeros(2, 4, 8), "fp8")
    assert torch.equal(fp8.scales, torch.ones(2)) and torch.equal(fp8.dequantize(),
                                                                    torch.zeros(2, 4, 8))


def test_bad_encodings_are_refused():
    with pytest.raises(ValueError, match="feature dtype must be one of"):
        encode(_features(), "fp16")
    with pytest.raises(ValueError, match="fp8 values need their per-image scales"):
        ImageFeatures(torch.zeros(2, 4, 8, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="scales must be \\[2\\]"):
        ImageFeatures(torch.zeros(2, 4, 8, dtype=torch.float8_e4m3fn), torch.ones(3))
    with pytest.raises(TypeError, match="has dtype torch.float16"):
        ImageFeatures(torch.zeros(2, 4, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="different encodings"):
        ImageFeatures.cat([encode(_features(), "bf16"), encode(_features(), "fp8")])
    torch.testing.assert_close(dequantize(torch.ones(1, 2, 2), None), torch.ones(1, 2, 2))


def test_weights_hash_names_the_weights_and_their_dtype():
    torch.manual_seed(0)
    vision = UniGenConfig.tiny().vision
    a, b = build_frozen_clip(vision), build_frozen_clip(vision)
    b.load_state_dict(a.state_dict())
    assert vit_weights_hash(a) == vit_weights_hash(b)
    with torch.no_grad():
        b.encoder.layers[0].mlp.fc1.weight[0, 0] += 1e-3
    assert vit_weights_hash(a) != vit_weights_hash(b)
    vision.compute_dtype = "bfloat16"
    c = build_frozen_clip(vision)
    c.load_state_dict(a.state_dict())  # the same weights, held in bf16
    assert vit_weights_hash(c) != vit_weights_hash(a)


def _batch(model: UniGen, images: torch.Tensor) -> UniGenBatch:
    """Four image samples (cap, qus) and two pairs over ``images``."""
    cfg = model.config
    text = torch.randint(5, cfg.text.vocab_size, (3, 6))
    return UniGenBatch(
        task=torch.tensor([1, 1, 2, 2]), image_index=torch.tensor([0, 1, 2, 3]),
        text_index=torch.tensor([-1, -1, 0, 1]),
        target_ids=torch.tensor([7, 8, 2, 9, 2, 10, 2, 11, 12, 2]),
        target_cu_seqlens=torch.tensor([0, 3, 5, 7, 10], dtype=torch.int32),
        images=images, text_ids=text, text_mask=torch.ones(3, 6, dtype=torch.bool),
        pair_image_index=torch.tensor([0, 1]), pair_text_index=torch.tensor([1, 2]))


def test_forward_from_stored_features_equals_forward_from_pixels():
    cfg = UniGenConfig.tiny()
    cfg.tasks.match_yes_ids, cfg.tasks.match_no_ids, cfg.tasks.eos_token_id = (4,), (5,), 2
    cfg.__post_init__()
    torch.manual_seed(0)
    model = UniGen(cfg).train()
    images = torch.randn(4, 3, 32, 32)
    pixels = _batch(model, images)
    stored = encode(model.image_encoder.vit_features(images), "fp32")
    from_store = dataclasses.replace(pixels, images=None, image_features=stored.values)
    assert from_store.num_images == 4 and feature_shape(cfg.vision) == (17, 48)
    out = [model(b, generator=torch.Generator().manual_seed(1)) for b in (pixels, from_store)]
    assert torch.equal(out[0].loss, out[1].loss)
    grads = []
    for o in out:
        model.zero_grad()
        o.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "image_encoder.ln_vision.weight" in grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_batch_and_model_refuse_malformed_features():
    cfg = UniGenConfig.tiny()
    torch.manual_seed(0)
    model = UniGen(cfg)
    batch = _batch(model, torch.randn(4, 3, 32, 32))
    batch.image_features = torch.zeros(4, 17, 48)
    with pytest.raises(ValueError, match="images and image_features exclude each other"):
        batch.validate()
    batch.images = None
    batch.image_features = torch.zeros(4, 17, 48, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="image_feature_scales must be given for fp8"):
        batch.validate()
    batch.image_feature_scales = torch.ones(3)
    with pytest.raises(ValueError, match="must be \\[4\\] \\(one per image\\)"):
        batch.validate()
    with pytest.raises(ValueError, match="image_features must be \\[N, 17, 48\\]"):
        model.encode_image_features(torch.zeros(4, 16, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_batch_refuses_non_finite_pixels_and_features(dtype):
    """The model runs its ops without their finiteness checks: the batch's own float inputs are
    checked by its validation, named (fp8 has no inf; its NaN is checked on the bits)."""
    cfg = UniGenConfig.tiny()
    torch.manual_seed(0)
    model = UniGen(cfg)
    batch = _batch(model, torch.randn(4, 3, 32, 32))
    batch.validate()
    batch.images[2, 1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="UniGenBatch.images contains non-finite values"):
        batch.validate()
    batch.images = None
    feats = torch.zeros(4, 17, 48)
    batch.image_features = feats.to(dtype)
    if dtype == torch.float8_e4m3fn:
        batch.image_feature_scales = torch.ones(4)
    batch.validate()
    feats[1, 5, 7] = float("nan") if dtype == torch.float8_e4m3fn else float("inf")
    batch.image_features = feats.to(dtype)
    with pytest.raises(ValueError, match="UniGenBatch.image_features contains non-finite values"):
        batch.validate()
    if dtype == torch.float8_e4m3fn:
        batch.image_features = torch.zeros(4, 17, 48).to(dtype)
        batch.image_feature_scales = torch.tensor([1.0, 0.0, 1.0, 1.0])
        with pytest.raises(ValueError, match="image_feature_scales must be finite and > 0"):
            batch.validate()
