"""python -m unigen.data.prepare cc6l: UC2's and CCLM's translated CC3M captions, joined by URL
to an img2dataset download, become the CC6L lines MultilingualCaptionStream reads."""

import csv
import json
import os

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from data_test_helpers import jpeg_bytes, smooth_image, write_tar  # noqa: E402

from unigen.data import DataFormatError  # noqa: E402
from unigen.data.cc6l_release import prepare_cc6l  # noqa: E402
from unigen.data.multilingual_captions import MultilingualCaptionStream  # noqa: E402
from unigen.data.prepare import main  # noqa: E402
from unigen.data.webdataset_images import ImageStore  # noqa: E402

URLS = [f"http://img.example/{i}.jpg" for i in range(5)]


def _download(tmp_path):
    """An img2dataset webdataset folder: rows 0, 1, 3, 4 downloaded, row 2 failed."""
    folder = tmp_path / "cc3m"
    folder.mkdir()
    statuses = ["success", "success", "failed_to_download", "success", "success"]
    keys = [f"{i:09d}" for i in range(5)]
    table = pa.table({"url": URLS, "caption": [f"english {i}" for i in range(5)], "key": keys,
                      "status": statuses, "error_message": [None, None, "404", None, None]})
    pq.write_table(table, str(folder / "00000.parquet"))
    write_tar(str(folder / "00000.tar"),
              [(f"{k}.jpg", jpeg_bytes(smooth_image(16, seed=i)))
               for i, (k, s) in enumerate(zip(keys, statuses)) if s == "success"])
    return str(folder), keys


def _uc2_file(path, rows):
    """As UC2's ms_internal_mt.py writes it: csv.writer with a tab delimiter."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        for row in rows:
            writer.writerow(row)


@pytest.fixture
def uc2_release(tmp_path):
    folder = tmp_path / "uc2"
    folder.mkdir()
    _uc2_file(folder / "train_imageId2Ann.tsv", [
        ["100", URLS[0], "a dog on a lawn", "success"],
        ["101", URLS[1], 'a sign saying "stop"\tin red', "success"],  # quoted by csv.writer
        ["102", URLS[2], "never downloaded", "success"],
        ["103", URLS[3], "a bird", "success"],
    ])
    _uc2_file(folder / "train_imageId2Ann_de.tsv", [
        ["100", URLS[0], "ein Hund auf einem Rasen", "success"],
        ["101", URLS[1], "", "fail"],  # the translator failed
        ["102", URLS[2], "nie heruntergeladen", "success"],
        ["104", URLS[4], "nur deutsch", "success"],  # no English caption for this image
    ])
    _uc2_file(folder / "train_imageId2Ann_zh.tsv", [
        ["103", URLS[3], "一只鸟", "success"],
        ["100", URLS[0], "草坪上的狗", "success"],  # another order than the English file
    ])
    with open(folder / "train_imageId2Ann_fr.tsv", "a", encoding="utf-8") as f:
        f.write("only two\tcolumns\n")
    (folder / "README.txt").write_text("not a caption file")
    return str(folder)


def test_uc2_files_join_by_url_to_the_download_keys(uc2_release, tmp_path):
    images, keys = _download(tmp_path)
    out = str(tmp_path / "cc6l.jsonl")
    logged = []
    counts = prepare_cc6l([uc2_release], images, out, source="uc2", log=logged.append)
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert lines == [
        {"key": keys[0], "captions": {"en": "a dog on a lawn", "de": "ein Hund auf einem Rasen",
                                      "zh": "草坪上的狗"}},
        {"key": keys[1], "captions": {"en": 'a sign saying "stop"\tin red'}},
        {"key": keys[3], "captions": {"en": "a bird", "zh": "一只鸟"}},
    ]
    assert counts["files"] == 4 and counts["lines"] == 11 and counts["bad_lines"] == 1
    assert counts["failed_translations"] == 1 and counts["not_downloaded"] == 2
    assert counts["no_english"] == 1 and counts["images"] == 3
    assert counts["per_language"] == {"de": 2, "en": 3, "zh": 2}
    assert counts["download_downloaded"] == 4 and counts["download_rows"] == 5
    assert any("3 images" in line for line in logged)

    # what the training reads: every image of the output found in the shards, English present
    stream = MultilingualCaptionStream([out], images=ImageStore([os.path.join(images, "00000.tar")]),
                                       multilingual_fraction=1.0, seed=0, shuffle=False, epochs=1)
    samples = list(stream)
    assert sorted(s["key"] for s in samples) == [keys[0], keys[1], keys[3]]
    assert {s["lang"] for s in samples if s["key"] == keys[0]} <= {"de", "zh"}


def test_a_rerun_with_the_done_file_does_nothing(uc2_release, tmp_path):
    images, _ = _download(tmp_path)
    out = str(tmp_path / "cc6l.jsonl")
    first = prepare_cc6l([uc2_release], images, out, log=lambda _: None)
    os.utime(out, (0, 0))
    logged = []
    assert prepare_cc6l([uc2_release], images, out, log=logged.append) == first
    assert os.stat(out).st_mtime == 0 and "done before" in logged[0]
    assert not os.path.exists(out + ".tmp")


def test_cclm_json_lines_with_caption_dicts(tmp_path):
    images, keys = _download(tmp_path)
    release = tmp_path / "cclm.jsonl"
    rows = [{"url": URLS[0], "caption": {"en": "a dog", "ja": "犬", "cs": ""}},
            {"url": URLS[3], "caption": [{"en": "a bird", "fr": "un oiseau"}, {"en": "other"}]},
            {"url": URLS[2], "caption": {"en": "never downloaded"}}]
    release.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows)
                       + "\nnot json\n", encoding="utf-8")
    out = str(tmp_path / "out.jsonl")
    counts = prepare_cc6l([str(release)], images, out, source="cclm", log=lambda _: None)
    assert [json.loads(line) for line in open(out, encoding="utf-8")] == [
        {"key": keys[0], "captions": {"en": "a dog", "ja": "犬"}},
        {"key": keys[3], "captions": {"en": "a bird", "fr": "un oiseau"}},
    ]
    assert counts["bad_lines"] == 1 and counts["empty_captions"] == 1
    assert counts["not_downloaded"] == 1


def test_cclm_record_without_the_url_field_names_what_it_has(tmp_path):
    images, _ = _download(tmp_path)
    release = tmp_path / "cclm.jsonl"
    release.write_text(json.dumps({"image": "cc3m/0.jpg", "caption": {"en": "x"}}) + "\n")
    with pytest.raises(DataFormatError, match=r"no 'url' field.*\['caption', 'image'\].*--url-field"):
        prepare_cc6l([str(release)], images, str(tmp_path / "o.jsonl"), source="cclm",
                     log=lambda _: None)


def test_bad_inputs_are_clear_errors(uc2_release, tmp_path):
    images, _ = _download(tmp_path)
    with pytest.raises(DataFormatError, match="no NNNNN.parquet"):
        prepare_cc6l([uc2_release], str(tmp_path), str(tmp_path / "o.jsonl"), log=lambda _: None)
    with pytest.raises(FileNotFoundError, match="no such file"):
        prepare_cc6l([str(tmp_path / "absent")], images, str(tmp_path / "o.jsonl"))
    odd = tmp_path / "captions.tsv"
    _uc2_file(odd, [["1", URLS[0], "x", "success"]])
    with pytest.raises(DataFormatError, match="--lang"):
        prepare_cc6l([str(odd)], images, str(tmp_path / "o.jsonl"), log=lambda _: None)
    counts = prepare_cc6l([str(odd)], images, str(tmp_path / "o.jsonl"), lang="en",
                          log=lambda _: None)
    assert counts["images"] == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    pq.write_table(pa.table({"url": URLS[:1], "key": ["0"]}), str(broken / "00000.parquet"))
    with pytest.raises(DataFormatError, match=r"without column\(s\) \['status'\]"):
        prepare_cc6l([uc2_release], str(broken), str(tmp_path / "p.jsonl"), log=lambda _: None)


def test_cli_one_line_error_and_success(uc2_release, tmp_path, capsys):
    images, _ = _download(tmp_path)
    out = str(tmp_path / "cli.jsonl")
    assert main(["cc6l", uc2_release, "--images", images, "--out", out]) == 0
    assert "3 images" in capsys.readouterr().out
    assert main(["cc6l", uc2_release, "--images", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a directory" in err[0]
    np.testing.assert_equal(os.path.exists(tmp_path / "x.jsonl"), False)
