"""python -m unigen.data.check CONFIG: every source a config names, counted per language."""

import json
import os

import yaml

from unigen.data.check import main, source_counts
from unigen.data.config import DataConfig
from unigen.data.sizes import image_pair_count, shard_sample_count


def _config(world, **extra) -> DataConfig:
    return DataConfig(wikimatrix=tuple(world.wikimatrix), image_shards=tuple(world.image_shards),
                      cc6l=(world.cc6l,), ccqa=(world.ccqa,), **extra)


def test_counts_per_source_and_language(world, tmp_path):
    counts = source_counts(_config(world, min_score=None))
    assert counts["image_shards"] == {"languages": {"en": world.counts["images"]}, "skipped": 0}
    with open(world.cc6l) as f:
        lines = [json.loads(line) for line in f]
    langs = {lang for r in lines for lang in r["captions"]}
    assert counts["cc6l"]["languages"] == {
        lang: sum(lang in r["captions"] for r in lines) for lang in sorted(langs)}
    wm = counts["wikimatrix"]["languages"]
    assert len(wm) == len(world.wikimatrix)  # one language pair per file
    assert set(wm.values()) == {world.counts["text_pairs_per_language"]}
    with open(world.ccqa) as f:
        assert counts["ccqa"]["languages"]["en"] == sum(1 for line in f if line.strip())


def test_bad_lines_are_counted_and_the_cli_prints_a_table(world, tmp_path, capsys):
    cc6l = tmp_path / "cc6l.jsonl"
    with open(world.cc6l) as f:
        good = f.read().splitlines()
    cc6l.write_text("\n".join(good[:5] + ["{not json", json.dumps({"key": "nope", "captions":
                                                                 {"en": "x"}})]) + "\n")
    cfg = {"data": {"image_shards": list(world.image_shards), "cc6l": [str(cc6l)],
                    "ratios": {"trans": 0.0, "cap": 1.0, "qus": 0.0, "match": 1.0}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "cc6l" in out and "image_shards" in out
    table = [line.split() for line in out.splitlines() if line.startswith("cc6l")]
    # five good lines; skipped: the malformed one and the one whose key has no image
    assert ["cc6l", "en", "5"] in table and ["cc6l", "(skipped)", "2"] in table
    cfg["data"]["image_shards"] = [str(tmp_path / "missing")]
    path.write_text(yaml.safe_dump(cfg))
    assert main([str(path)]) == 2
    assert "missing" in capsys.readouterr().err


def test_shard_sizes_from_img2dataset_stats_or_a_scan(world, tmp_path):
    shard = world.image_shards[0]
    scanned = shard_sample_count(shard)
    assert scanned > 0 and image_pair_count(world.image_shards) == world.counts["images"]
    copy = tmp_path / "00000.tar"
    with open(shard, "rb") as src:
        copy.write_bytes(src.read())
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 50, "successes": 41}))
    assert shard_sample_count(str(copy)) == 41  # img2dataset's count of what it wrote
    os.remove(tmp_path / "00000_stats.json")
    assert shard_sample_count(str(copy)) == scanned
