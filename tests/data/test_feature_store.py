"""The feature store: ``python -m unigen.data.prepare image-features`` over webdataset shards
(every image once, the undecodable reported and recorded, resumable, refusing to mix stores),
its views, and what the training loader reads from it instead of pixels."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from data_test_helpers import jpeg_bytes, smooth_image, write_tar

from unigen.data import ImageSpec, PilImageDecoder, PilImageTransform, WebdatasetImageTextStream
from unigen.data.batches import batch_from_task_groups
from unigen.data.build import open_training_store
from unigen.data.collate import collate_task_batch
from unigen.data.config import DataConfig
from unigen.data.feature_extraction import view_boxes
from unigen.data.feature_store import (
    FeatureStore,
    FeatureStoreError,
    StoredFeatureDecoder,
    StoredImage,
    StoredImageRefs,
)
from unigen.data.prepare import main as prepare
from unigen.data.webdataset_images import iter_shard_images
from unigen.model.config import UniGenConfig
from unigen.model.image_encoder import vit_forward
from unigen.model.pretrained import load_frozen_vit
from unigen.model.unigen_model import UniGen
from unigen.model.vit_features import vit_weights_hash

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")
CORRUPT = b"\xff\xd8\xff\xe0 not a jpeg"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two shards (6 samples each, images of several sizes): one image that does not decode
    and one sample without image (img2dataset's failed download), a tiny saved model, and a
    pre-training config naming them."""
    root = tmp_path_factory.mktemp("feature_store")
    for s in range(2):
        members = []
        for i in range(6):
            key = f"{s}{i:04d}"
            image = CORRUPT if (s, i) == (0, 2) else jpeg_bytes(smooth_image(24 + 8 * i, seed=i + 7 * s))
            if (s, i) != (1, 4):
                members.append((f"{key}.jpg", image))
            members += [(f"{key}.txt", f"caption {key}".encode()), (f"{key}.json", b"{}")]
        write_tar(root / f"{s:05d}.tar", members)
    torch.manual_seed(0)
    UniGen(UniGenConfig.tiny()).save_pretrained(root / "pre")
    torch.manual_seed(1)
    UniGen(UniGenConfig.tiny()).save_pretrained(root / "other")
    return root


def write_config(root, name="config.yaml", **data):
    config = {"model": "tiny", "init": {"from_pretrained": str(root / data.pop("model", "pre"))},
              "data": {"image_shards": [str(root / "*.tar")], "ratios": {"cap": 1.0}, **data}}
    path = root / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def extract(root, out, *args, config=None):
    workers = () if "--workers" in args else ("--workers", "0")
    return prepare(["image-features", config or write_config(root), "--out", str(root / out),
                    *workers, *args])


def test_every_image_is_stored_once_as_the_training_loader_sees_it(sources, capsys):
    assert extract(sources, "store") == 0
    out = capsys.readouterr().out
    assert f"skipped an image that does not decode: {sources / '00000.tar'}[00002] (1 so far)" in out
    assert "unit 00000 done: 5 images (1 undecodable, 0 without image)" in out
    assert "unit 00001 done: 5 images (0 undecodable, 1 without image)" in out
    assert "2 of 2 units (complete), 10 images (1 undecodable), 1 view(s), bf16" in out
    store = FeatureStore(sources / "store")
    m = store.manifest
    clip, vision = load_frozen_vit(sources / "pre")
    assert (m.dtype, m.tokens, m.width, m.views, m.image_size, m.interpolation) == (
        "bf16", 17, 48, 1, 32, "bicubic")
    assert m.vit_sha256 == vit_weights_hash(clip) and m.autocast == "none"
    assert len(store) == 10 and store.undecodable == {"00002": f"{sources / '00000.tar'}[00002]"}
    assert store.lookup("00002") is None and "10004" not in store
    with pytest.raises(Exception, match="'10004' is not in the feature store"):
        store.lookup("10004")
    # each stored value is the ViT's output on the training loader's pixels, in bf16
    transform = PilImageTransform(ImageSpec(32, "bicubic"))
    for key in ("00000", "00005", "10003"):
        data = dict(iter_shard_images(str(sources / f"0000{key[0]}.tar")))[key]
        expected = vit_forward(clip, vision, transform(data)[None]).to(torch.bfloat16)
        assert torch.equal(store.lookup(key).values, expected), key


def test_a_stopped_extraction_resumes_and_a_finished_one_does_nothing(sources, capsys):
    assert extract(sources, "resumed") == 0
    first = FeatureStore(sources / "resumed")
    before = {k: first.lookup(k).values for k in first._where}
    # a stop inside unit 00001: its record never written, a part left behind; the rerun reads
    # through two loader workers, in ViT batches of 3 and files of 2 images
    os.remove(sources / "resumed" / "done" / "00001.json")
    capsys.readouterr()
    assert extract(sources, "resumed", "--workers", "2", "--batch-size", "3",
                   "--images-per-file", "2") == 0
    out = capsys.readouterr().out
    assert "this process takes 2 (1 done before)" in out and "unit 00001 done" in out
    assert "unit 00000 done" not in out
    again = FeatureStore(sources / "resumed")
    assert sorted(os.listdir(sources / "resumed" / "shards")) == [
        "00000-00000.safetensors", "00001-00000.safetensors", "00001-00001.safetensors",
        "00001-00002.safetensors"]
    assert again._where.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(again.lookup(k).values, v), k
    assert extract(sources, "resumed") == 0
    assert "(2 done before)" in capsys.readouterr().out


def test_a_store_is_never_mixed_with_other_weights_or_settings(sources, capsys):
    assert extract(sources, "mixed") == 0
    capsys.readouterr()
    assert extract(sources, "mixed", "--dtype", "fp8") == 2
    err = capsys.readouterr().err
    assert "holds a store made with other settings (dtype: 'bf16' vs 'fp8': the store's vs " \
        "this config's)" in err
    other = write_config(sources, "other.yaml", model="other")
    assert extract(sources, "mixed", config=other) == 2
    assert "vit_sha256: '" in capsys.readouterr().err


def test_views_are_seeded_random_resized_crops_one_per_epoch(sources):
    config = write_config(sources, "crops.yaml", random_resized_crop=[0.5, 1.0])
    assert extract(sources, "views", "--views", "3", "--crop-seed", "5", config=config) == 0
    store = FeatureStore(sources / "views")
    assert store.manifest.views == 3 and store.manifest.random_resized_crop == (0.5, 1.0)
    from safetensors import safe_open

    with safe_open(str(sources / "views" / "shards" / "00001-00000.safetensors"), "pt") as f:
        keys, boxes = json.loads(f.metadata()["keys"]), f.get_tensor("crop_boxes")
        assert f.get_tensor("features").shape == (5, 3, 17, 48)
    side = 24 + 8 * 3  # key 10003's image
    assert boxes[keys.index("10003")].tolist() == [list(b) for b in view_boxes(
        "10003", side, side, 3, (0.5, 1.0), 5)]
    views = [store.lookup("10003", v).values for v in range(3)]
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[1], views[2])
    # the same seed gives the same store, bit for bit
    assert extract(sources, "views_again", "--views", "3", "--crop-seed", "5", config=config) == 0
    assert torch.equal(FeatureStore(sources / "views_again").lookup("10003", 2).values, views[2])
    # a stream's epoch e reads view e % 3
    stream = WebdatasetImageTextStream([str(sources / "00001.tar")], epochs=4,
                                       image_ref=StoredImageRefs(3))
    refs = [s["image"] for s in stream]
    assert [r.view for r in refs if r.key == "10003"] == [0, 1, 2, 0]


def test_the_loader_reads_stored_features_and_drops_as_the_pixel_path(sources):
    assert extract(sources, "store") == 0
    store = FeatureStore(sources / "store")

    def samples(**kwargs):
        stream = WebdatasetImageTextStream([str(sources / "00000.tar")], epochs=1, **kwargs)
        return [dict(s, encoder_ids=[0], target_ids=[1, 2]) for s in stream]

    pixels = collate_task_batch(samples(), encoder_pad_id=1, decoder_pad_id=0,
                                image_decoder=PilImageDecoder(ImageSpec(32, "bicubic")))
    stored = collate_task_batch(samples(image_ref=StoredImageRefs(1)), encoder_pad_id=1,
                                decoder_pad_id=0, image_decoder=StoredFeatureDecoder(store))
    assert stored["dropped_samples"] == pixels["dropped_samples"] == [
        f"{sources / '00000.tar'}[00002]"]
    assert stored["cap"]["key"] == pixels["cap"]["key"]
    batch = batch_from_task_groups({"cap": stored["cap"]})
    assert batch.images is None and batch.image_features.dtype == torch.bfloat16
    clip, vision = load_frozen_vit(sources / "pre")
    expected = vit_forward(clip, vision, pixels["cap"]["images"]).to(torch.bfloat16)
    assert torch.equal(batch.image_features, expected)
    with pytest.raises(TypeError, match="carry StoredImage references"):
        StoredFeatureDecoder(store).decode([b"jpeg bytes"])


def test_a_run_the_store_cannot_serve_is_refused_naming_the_option(sources, tmp_path):
    assert extract(sources, "store") == 0
    shards = (str(sources / "*.tar"),)

    def opened(**kwargs):
        cfg = dict(image_shards=shards, ratios={"cap": 1.0}, image_size=32,
                   image_features=str(sources / "store"))
        return open_training_store(DataConfig(**{**cfg, **kwargs}))

    assert len(opened()) == 10
    with pytest.raises(FeatureStoreError, match=r"data.image_size = 64 but the feature store .* "
                                                r"was made with 32"):
        opened(image_size=64)
    with pytest.raises(FeatureStoreError, match="data.interpolation = 'bilinear'"):
        opened(interpolation="bilinear")
    with pytest.raises(FeatureStoreError, match=r"data.random_resized_crop = \(0.5, 1.0\) but .* "
                                                r"made with None"):
        opened(random_resized_crop=(0.5, 1.0))
    extra = tmp_path / "00007.tar"
    shutil.copy(sources / "00001.tar", extra)
    with pytest.raises(FeatureStoreError, match=r"has no features of 1 source unit\(s\) the run "
                                                r"reads \(00007\); 2 of 2 units are extracted"):
        opened(image_shards=shards + (str(extra),))
    with pytest.raises(FeatureStoreError, match="is not a feature store"):
        opened(image_features=str(tmp_path))
    with pytest.raises(ValueError, match="data.image_features and data.image_backend=dali"):
        DataConfig(image_shards=shards, ratios={"cap": 1.0}, image_features="x",
                   image_backend="dali")


def test_bad_extraction_requests_end_in_one_line(sources, capsys):
    config = write_config(sources, "random_init.yaml")
    raw = yaml.safe_load(open(config))
    del raw["init"]
    open(config, "w").write(yaml.safe_dump(raw))
    assert extract(sources, "x", config=config) == 2
    assert "has no pre-trained weights (init.clip_dir and init.from_pretrained are empty)" in \
        capsys.readouterr().err
    assert extract(sources, "x", "--views", "2") == 2
    assert "--views 2 needs crops" in capsys.readouterr().err
    assert prepare(["image-features", write_config(sources), "--workers", "0"]) == 2
    assert "give --out DIR (the config sets no data.image_features)" in capsys.readouterr().err


def test_views_cycle_and_boxes_do_not_depend_on_order():
    refs = StoredImageRefs(4)
    assert [refs("k", e) for e in (0, 3, 4, 9)] == [StoredImage("k", v) for v in (0, 3, 0, 1)]
    a = view_boxes("key", 60, 80, 3, (0.5, 1.0), 0)
    assert view_boxes("key", 60, 80, 2, (0.5, 1.0), 0) == a[:2]
    assert view_boxes("key", 60, 80, 3, (0.5, 1.0), 1) != a
    for top, left, h, w in a:
        assert 0.5 * 60 * 80 * 0.9 <= h * w <= 60 * 80 and top + h <= 60 and left + w <= 80
    assert np.unique([b[2] * b[3] for b in a]).size == 3


def test_the_data_check_opens_the_store_as_a_run_does(sources, capsys):
    from unigen.data.check import main as check

    assert extract(sources, "store") == 0
    capsys.readouterr()
    assert check([write_config(sources, "checked.yaml", image_features=str(sources / "store"))]) == 0
    assert re.search(r"image_features +\(images\) +10\n", capsys.readouterr().out)
    crops = write_config(sources, "checked_crops.yaml", image_features=str(sources / "store"),
                         random_resized_crop=[0.5, 1.0])
    assert check([crops]) == 2
    assert "data.random_resized_crop = (0.5, 1.0) but the feature store" in capsys.readouterr().err
