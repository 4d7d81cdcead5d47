"""The loader's image work per CPU worker: reading stored ViT features (a feature store,
``data.image_features``) against decoding JPEGs, and the read bandwidth a paper run needs.

One process on one thread stands for one DataLoader worker. Each round hands it the images of paper-size
steps (48 images: 64 samples per GPU, of which the image tasks cap, qus and match are 3/4) and
times what the loader does for them:

- ``jpeg_pil``: the pixel path — each JPEG's bytes read from its uncompressed shard by key
  (``ImageStore``), decoded, resized to 224 (bicubic) and normalised (``PilImageDecoder``);
- ``ours_features_bf16`` / ``ours_features_fp8``: the store path — each image's
  ``[257, 1024]`` CLIP ViT-L/14 output read from its safetensors file by key
  (``StoredFeatureDecoder``).

The JPEGs are CC3M as img2dataset stores it for UniGen (shorter side 256, ``keep_ratio``, its
default quality 95), synthetic smooth images. The stores are made by the real extraction with a
one-layer ViT of ViT-L/14's width and tokens (the read cost depends on the shape, not on the
weights). Files are read through the page cache, warm: this measures the CPU work of a worker,
not the disk; the disk (or network file system) must supply the bandwidth in the summary:
``images/s × bytes per image`` at 1000 samples/s per GPU. The summary also gives the fp8
encoding's error against bf16 on these features. Results: ``feature_loader.md`` /
``feature_loader.json`` in ``$OUT`` (when set) or ``benchmarks/results/local/``.
"""

import io
import json
import os
import tarfile
import time

import numpy as np
import pytest
import torch

from benchmarks.conftest import device_name, results_dir
from unigen.data.config import DataConfig
from unigen.data.feature_extraction import ExtractionPlan, Unit, extract_features
from unigen.data.feature_store import FeatureStore, StoredFeatureDecoder, StoredImage
from unigen.data.image_pipeline import ImageSpec, PilImageDecoder
from unigen.data.webdataset_images import ImageStore
from unigen.model.config import VisionConfig
from unigen.model.image_encoder import build_frozen_clip

IMAGES = 96                     # two paper-size steps' images
STEP_IMAGES = 48                # images of one step on one GPU (64 samples × 3/4)
TARGET_SAMPLES_PER_S = 1000     # per GPU
ROUNDS = 5
PROVIDERS = ["ours_features_bf16", "ours_features_fp8", "jpeg_pil"]
_RESULTS: dict[str, dict] = {}


def images_per_sample() -> float:
    """Share of the samples that carry an image at the default (the paper's equal) ratios."""
    ratios = DataConfig().ratios
    return sum(ratios[t] for t in ("cap", "qus", "match")) / sum(ratios.values())


def _cc3m_jpeg(i: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(i)
    h, w = 256, int(rng.integers(256, 400))  # img2dataset keep_ratio: the shorter side 256
    y, x = np.mgrid[0:h, 0:w] / 64.0
    rgb = np.stack([np.sin(x * rng.uniform(0.5, 3) + y * rng.uniform(0.5, 3) + c) for c in range(3)],
                   -1)
    rgb = ((rgb + 1) * 127.5 + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A DataLoader worker runs torch on one thread (torch sets it so in every worker)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature_loader")
    shard = root / "00000.tar"
    keys = [f"{i:09d}" for i in range(IMAGES)]
    jpeg_bytes = 0
    with tarfile.open(shard, "w") as tar:
        for i, key in enumerate(keys):
            for name, payload in ((f"{key}.jpg", _cc3m_jpeg(i)), (f"{key}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                jpeg_bytes += len(payload) if name.endswith(".jpg") else 0
    # ViT-L/14's output shape from one cheap layer: 224 / 14 = 16 × 16 patches + [CLS], 1024
    vision = VisionConfig(num_hidden_layers=1, feature_layer=-1, intermediate_size=64)
    torch.manual_seed(0)
    clip = build_frozen_clip(vision)
    plan = ExtractionPlan(kind="webdataset", units=[Unit("00000", str(shard))],
                          spec=ImageSpec(224, "bicubic"), crop_scale=None, vit_source="bench",
                          load_vit=lambda: (clip, vision), precision="fp32",
                          sources={"kind": "webdataset", "units": ["00000"]})
    for dtype in ("bf16", "fp8"):
        extract_features(plan, str(root / dtype), dtype=dtype, batch_size=32, workers=0,
                         device="cpu", rank=0, world_size=1, log=lambda line: None)
    os.sync()  # the stores' pages written back before any read is timed
    return {"root": root, "shard": str(shard), "keys": keys, "jpeg_bytes": jpeg_bytes / IMAGES}


def _reader(provider, data):
    if provider == "jpeg_pil":
        store, decoder = ImageStore([data["shard"]]), PilImageDecoder(ImageSpec(224, "bicubic"))
        return (lambda keys: decoder.decode([store[k] for k in keys])), data["jpeg_bytes"]
    store = FeatureStore(data["root"] / provider.rsplit("_", 1)[-1])
    decoder = StoredFeatureDecoder(store)
    return (lambda keys: decoder.decode([StoredImage(k, 0) for k in keys])), \
        store.manifest.bytes_per_view


@pytest.mark.parametrize("provider", PROVIDERS)
def test_loader_images_per_worker(benchmark, provider, data):
    read, bytes_per_image = _reader(provider, data)
    keys = data["keys"]
    read(keys[:STEP_IMAGES])  # first touch: file handles, page cache
    times = []

    def one_round():
        t0 = time.perf_counter()
        for start in range(0, IMAGES, STEP_IMAGES):
            out, ok = read(keys[start:start + STEP_IMAGES])
            assert len(ok) == len(keys[start:start + STEP_IMAGES])
        times.append(time.perf_counter() - t0)

    benchmark.group = "feature_loader"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    sec = float(np.median(times[1:]))
    per_image = images_per_sample()
    need = TARGET_SAMPLES_PER_S * per_image  # images/s per GPU
    row = {"images_per_s_per_worker": IMAGES / sec,
           "samples_per_s_per_worker": IMAGES / sec / per_image,
           "bytes_per_image": bytes_per_image,
           "workers_for_1000_samples_per_s": need / (IMAGES / sec),
           "read_mb_per_s_per_gpu": need * bytes_per_image / 1e6,
           "read_gb_per_s_per_8_gpus": 8 * need * bytes_per_image / 1e9}
    benchmark.extra_info.update(device=device_name(torch.device("cpu")), **row)
    _RESULTS[provider] = row
    _write_summary(data)


def _fp8_error(data) -> dict:
    """The fp8 store's features against the bf16 store's (the same ViT outputs)."""
    bf16, fp8 = (FeatureStore(data["root"] / d) for d in ("bf16", "fp8"))
    a = torch.cat([bf16.lookup(k).dequantize() for k in data["keys"]])
    b = torch.cat([fp8.lookup(k).dequantize() for k in data["keys"]])
    return {"relative_rms": float((b - a).norm() / a.norm()),
            "max_abs_over_image_amax": float(((b - a).abs().amax(dim=(1, 2))
                                              / a.abs().amax(dim=(1, 2))).max())}


def _write_summary(data):
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _RESULTS.get("jpeg_pil")
    lines = [f"# Loader image work per CPU worker ({IMAGES} images, CC3M-size JPEGs vs stored "
             f"ViT-L/14 features)", "", f"device: {device_name(torch.device('cpu'))}, torch "
             f"{torch.__version__}; page cache warm", "",
             "| provider | images/s per worker | samples/s per worker | vs jpeg_pil | KB per image "
             "| workers for 1000 samples/s | read MB/s per GPU | read GB/s per 8 GPUs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in _RESULTS.items():
        ratio = (f"{r['images_per_s_per_worker'] / jpeg['images_per_s_per_worker']:.1f}×"
                 if jpeg else "–")
        lines.append(f"| {name} | {r['images_per_s_per_worker']:.0f} | "
                     f"{r['samples_per_s_per_worker']:.0f} | {ratio} | "
                     f"{r['bytes_per_image'] / 1e3:.1f} | {r['workers_for_1000_samples_per_s']:.2f} "
                     f"| {r['read_mb_per_s_per_gpu']:.0f} | {r['read_gb_per_s_per_8_gpus']:.2f} |")
    error = _fp8_error(data)
    lines += ["", f"At 1000 samples/s per GPU a worker pool reads {TARGET_SAMPLES_PER_S * images_per_sample():.0f} "
                  f"images/s per GPU ({images_per_sample():.0%} of the samples carry an image).",
              f"fp8 (e4m3, per-image scale) against bf16 on these features: relative RMS error "
              f"{error['relative_rms']:.4f}, largest error {error['max_abs_over_image_amax']:.4f} "
              f"of the image's largest value."]
    (folder / "feature_loader.md").write_text("\n".join(lines) + "\n")
    (folder / "feature_loader.json").write_text(json.dumps(
        {"device": device_name(torch.device("cpu")), "torch": torch.__version__,
         "images": IMAGES, "results": _RESULTS, "fp8_vs_bf16": error}, indent=1))
