"""python -m unigen.data.prepare: WikiMatrix as LASER releases it → thresholded, deduplicated
shards the training stream reads; the completeness check of an img2dataset folder."""

import gzip
import json
import os
import shutil

import pytest

from unigen.data import DataFormatError
from unigen.data.prepare import check_img2dataset_folder, main, prepare_wikimatrix
from unigen.data.text_pairs import WikiMatrixStream


def _release(folder, name, rows):
    """A release file: margin score<TAB>l1 sentence<TAB>l2 sentence, gzip, by falling score."""
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, name), "wt", encoding="utf-8") as f:
        f.write("".join(row + "\n" for row in rows))


@pytest.fixture
def release(tmp_path):
    folder = str(tmp_path / "release")
    _release(folder, "WikiMatrix.de-en.tsv.gz", [
        "1.30\tein Hund\ta dog", "1.20\tein Hund\ta dog",  # a duplicate
        "1.10\tzwei Katzen\ttwo cats", "oops\tno\tscore", "1.09\tnur zwei", "1.05\t \tempty",
        "1.00\tunter der Schwelle\tbelow the threshold"])
    _release(folder, "WikiMatrix.en-fr.tsv.gz", ["1.50\ta cat\tun chat", "1.04\ta red box\tune boîte rouge"])
    _release(folder, "WikiMatrix.en-it.tsv.gz", ["1.50\ta cat\tun gatto"])  # not asked for
    return folder


def test_selects_dedupes_and_shards_what_the_stream_reads(release, tmp_path):
    out = str(tmp_path / "out")
    lines = []
    report = prepare_wikimatrix([release], out, languages=("de", "fr"), min_score=1.04,
                                shard_lines=1, log=lines.append)
    assert report["de-en"] == {"read": 7, "kept": 2, "below_threshold": 1, "duplicates": 1,
                               "bad_lines": 3, "shards": 2}
    assert report["en-fr"]["kept"] == 2 and not os.path.exists(os.path.join(out, "en-it"))
    samples = list(WikiMatrixStream([out], min_score=1.04))
    assert sorted((s["lang"], s["source_text"], s["target_text"]) for s in samples) == [
        ("de", "ein Hund", "a dog"), ("de", "zwei Katzen", "two cats"),
        ("fr", "un chat", "a cat"), ("fr", "une boîte rouge", "a red box")]
    assert any("de-en: read 7, kept 2" in line for line in lines)
    # resumable: a finished pair is not redone; an unfinished one (no done.json) is redone whole
    os.remove(os.path.join(out, "en-fr", "done.json"))
    lines.clear()
    again = prepare_wikimatrix([release], out, languages=("de", "fr"), shard_lines=1,
                               log=lines.append)
    assert again == report and "done before" in lines[0] and "en-fr: read 2" in lines[1]
    assert not [n for n in os.listdir(os.path.join(out, "de-en")) if n.endswith(".tmp")]


def test_missing_pairs_and_the_cli(release, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="en-es"):
        prepare_wikimatrix([release], str(tmp_path / "o"), languages=("es",))
    assert main(["wikimatrix", release, "--out", str(tmp_path / "cli"), "--languages", "de"]) == 0
    assert "2 pairs in 1 language pairs" in capsys.readouterr().out
    assert main(["wikimatrix", release, "--out", str(tmp_path / "x"), "--languages", "ko"]) == 2
    assert "en-ko" in capsys.readouterr().err


def test_img2dataset_folder_completeness(world, tmp_path):
    folder = tmp_path / "cc3m"
    folder.mkdir()
    from unigen.data.sizes import shard_sample_count

    for i, shard in enumerate(world.image_shards[:2]):
        shutil.copy(shard, folder / f"{i:05d}.tar")
        n = shard_sample_count(shard)
        (folder / f"{i:05d}_stats.json").write_text(json.dumps({"count": n + 3, "successes": n}))
    total = sum(shard_sample_count(s) for s in world.image_shards[:2])
    assert check_img2dataset_folder(str(folder)) == {"shards": 2, "samples": total}
    (folder / "00003_stats.json").write_text(json.dumps({"count": 1, "successes": 1}))
    (folder / "00001_stats.json").write_text(json.dumps({"count": 9, "successes": 999}))
    with pytest.raises(DataFormatError) as err:
        check_img2dataset_folder(str(folder))
    msg = str(err.value)
    assert "shard 00002: no tar" in msg and "shard 00003: no tar" in msg
    assert "shard 00001:" in msg and "its stats say 999" in msg
