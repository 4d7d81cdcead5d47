import json
import os
import tarfile

import numpy as np
import pytest
from data_test_helpers import jpeg_bytes, smooth_image, write_tar

from unigen.data import (
    DataFormatError,
    ImageStore,
    PilImageTransform,
    WebdatasetImageTextStream,
    read_wds_index,
    write_wds_index,
)
from unigen.data.webdataset_images import split_key


def test_reads_img2dataset_shards_of_the_world(world):
    s = WebdatasetImageTextStream(world.image_shards)
    samples = list(s)
    assert len(samples) == world.counts["images"] and s.skipped.total == 0
    first = samples[0]
    assert first["task"] == "cap" and first["lang"] == "en" and first["key"] == "000000000"
    assert first["image"][:2] == b"\xff\xd8"  # JPEG bytes left encoded
    assert first["meta"]["caption"] == first["caption"]
    with open(world.cc6l) as f:
        english = {r["key"]: r["captions"]["en"] for r in map(json.loads, f)}
    assert all(english[x["key"]] == x["caption"] for x in samples)


def test_pil_transform_in_stream_and_corrupt_samples_are_skipped(tmp_path):
    good = jpeg_bytes(smooth_image(32, 1))
    shard = write_tar(tmp_path / "00000.tar", [
        ("a.jpg", good), ("a.txt", b"a good one"), ("a.json", b'{"key": "a"}'),
        ("b.jpg", b"\xff\xd8 not really a jpeg"), ("b.txt", b"broken image"),
        ("c.json", b'{"key": "c", "status": "failed_to_download"}'),   # no image
        ("d.jpg", good), ("d.txt", b"   "),                                # empty caption
        ("e.jpg", good), ("e.txt", b"bad meta"), ("e.json", b"{oops"),
        ("f.jpg", good), ("f.txt", b"another good one"),
    ])
    s = WebdatasetImageTextStream(shard, image_transform=PilImageTransform())
    samples = list(s)
    assert [x["key"] for x in samples] == ["a", "f"]
    assert samples[0]["image"].shape == (3, 224, 224)
    assert s.skipped.as_dict() == {"image_decode": 1, "missing_image": 1, "missing_caption": 1,
                                   "bad_json": 1}


def test_truncated_tar_is_a_malformed_file(tmp_path):
    members = [(f"{i:03d}.{ext}", data) for i in range(6)
               for ext, data in (("jpg", jpeg_bytes(smooth_image(32, i))), ("txt", b"cap"))]
    shard = write_tar(tmp_path / "00000.tar", members)
    raw = open(shard, "rb").read()
    cut = tmp_path / "00001.tar"
    cut.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(DataFormatError) as info:
        list(WebdatasetImageTextStream(str(cut)))
    assert info.value.path == str(cut) and "member" in str(info.value.line)
    not_tar = tmp_path / "00002.tar"
    not_tar.write_bytes(b"hello" * 100)
    with pytest.raises(DataFormatError, match="not a readable tar archive"):
        list(WebdatasetImageTextStream(str(not_tar)))


def test_split_key_follows_webdataset():
    assert split_key("dir/000123.jpg") == ("dir/000123", "jpg")
    assert split_key("000123.seg.png") == ("000123", "seg.png")
    assert split_key("a.b/c.txt") == ("a.b/c", "txt")


def test_index_file_matches_dali_format_and_offsets(tmp_path, world):
    shard = world.image_shards[0]
    idx = write_wds_index(shard, str(tmp_path / "00000.idx"))
    with open(idx) as f:
        header = f.readline().split()
    entries = read_wds_index(idx)
    assert header == ["v1.2", str(len(entries))] and len(entries) == 40
    raw = open(shard, "rb").read()
    with tarfile.open(shard) as tar:
        for key, comps in entries[:5]:
            assert set(comps) == {"jpg", "txt", "json"}
            for ext, (off, size) in comps.items():
                assert raw[off: off + size] == tar.extractfile(f"{key}.{ext}").read()


def test_image_store_lookup_and_duplicates(tmp_path, world):
    store = ImageStore(world.image_shards)
    assert len(store) == world.counts["images"]
    assert all(os.path.exists(p) for p in store.index_paths)
    s = WebdatasetImageTextStream(world.image_shards[1])
    sample = next(iter(s))
    assert store[sample["key"]] == sample["image"]
    a = write_tar(tmp_path / "a.tar", [("k1.jpg", b"x"), ("k1.txt", b"t")])
    b = write_tar(tmp_path / "b.tar", [("k1.jpg", b"y"), ("k1.txt", b"t")])
    with pytest.raises(DataFormatError, match="key 'k1' also appears in"):
        ImageStore([a, b])
    with pytest.raises(DataFormatError, match="uncompressed"):
        gz = tmp_path / "c.tar.gz"
        gz.write_bytes(b"")
        ImageStore(str(gz))


def test_image_store_pickles_into_a_fresh_process_state(world):
    import pickle

    store = ImageStore(world.image_shards)
    key = next(iter(store.keys()))
    data = store[key]
    clone = pickle.loads(pickle.dumps(store))
    assert clone._files == {} and clone[key] == data
    assert np.frombuffer(data[:2], np.uint8).tolist() == [0xFF, 0xD8]


def test_skips_are_logged_with_their_location_then_rate_limited(tmp_path, caplog):
    from unigen.data import SkipStats
    from unigen.data.errors import CorruptSampleError

    members = []
    for i in range(14):
        members += [(f"{i:03d}.jpg", b"not an image"), (f"{i:03d}.txt", b"caption")]
    shard = write_tar(tmp_path / "00000.tar", members)
    s = WebdatasetImageTextStream(shard, image_transform=PilImageTransform())
    with caplog.at_level("WARNING", logger="unigen.data"):
        assert list(s) == []
    assert s.skipped.as_dict() == {"image_decode": 14}
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 10 and f"{shard}[0:000]" in logged[0] and "image_decode" in logged[0]
    stats = SkipStats(log_first=0, log_every=3)
    caplog.clear()
    with caplog.at_level("WARNING", logger="unigen.data"):
        for _ in range(7):
            stats.record("x", CorruptSampleError("r"))
    assert len(caplog.records) == 2 and stats.total == 7
