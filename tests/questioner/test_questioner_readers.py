import io
import json
import tarfile

import pytest

from unigen.questioner import BadRecord, CaptionReader, CaptionRecord, QuestionerError, UsageError
from unigen.questioner.readers import check_readable, detect_format


def records(paths, **kw):
    return list(CaptionReader(paths, **kw))


def good(recs):
    return [(r.key, r.caption) for r in recs if isinstance(r, CaptionRecord)]


def bad(recs):
    return [(r.key, r.reason) for r in recs if isinstance(r, BadRecord)]


def test_text_keys_are_global_line_numbers_and_bad_lines_keep_their_index(tmp_path):
    a = tmp_path / "a.txt"
    a.write_bytes(b"\xef\xbb\xbffirst  caption\r\n\nthird\tcaption\n")
    b = tmp_path / "b.txt"
    b.write_bytes(b"bad \xff byte\nlast one")  # no final newline
    recs = records([a, b])
    assert good(recs) == [("000000000", "first caption"), ("000000002", "third caption"), ("000000004", "last one")]
    assert bad(recs) == [("000000001", "empty_caption"), ("000000003", "undecodable")]
    assert CaptionReader([a, b]).count_lines() == 5


def test_tsv_takes_the_first_column(tmp_path):
    p = tmp_path / "cc3m.tsv"
    p.write_text("a dog on a sofa\thttp://example.com/1.jpg\n\thttp://example.com/2.jpg\n")
    recs = records([p])
    assert good(recs) == [("000000000", "a dog on a sofa")]
    assert bad(recs) == [("000000001", "empty_caption")]


def test_jsonl_uses_key_field_when_present(tmp_path):
    p = tmp_path / "caps.jsonl"
    lines = [
        json.dumps({"key": "img_7", "caption": "a cat"}),
        json.dumps({"caption": "no key here"}),
        "{broken",
        json.dumps({"text": "wrong field"}),
        json.dumps({"key": 12, "caption": "numeric key"}),
        json.dumps({"key": True, "caption": "bool key"}),
        json.dumps({"caption": "has <answer> tag"}),
        json.dumps({"caption": "x" * 50}),
    ]
    p.write_text("\n".join(lines) + "\n")
    recs = records([p], max_caption_chars=40)
    assert good(recs) == [("img_7", "a cat"), ("000000001", "no key here"), ("12", "numeric key")]
    assert [r for _, r in bad(recs)] == [
        "invalid_json", "missing_caption", "invalid_key", "caption_has_tag", "caption_too_long"
    ]
    other = records([p], caption_field="text", key_field="id")
    assert ("000000003", "wrong field") in good(other)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_keys_follow_the_webdataset_rule(tmp_path):
    shard = tmp_path / "shard-000.tar"
    _tar(shard, [
        ("000010001.jpg", b"\xff\xd8"),
        ("000010001.txt", b"a man on a horse"),
        ("000010001.json", b"{}"),
        ("sub/000010002.txt", b"two birds in the sky"),
        ("000010003.en.txt", b"not the caption member"),
        ("000010004.txt", b"\xff\xfe"),
    ])
    recs = records([shard])
    assert good(recs) == [("000010001", "a man on a horse"), ("sub/000010002", "two birds in the sky")]
    assert bad(recs) == [("000010004", "undecodable")]
    assert CaptionReader([shard]).count_lines() is None
    assert good(records([shard], text_ext="en.txt")) == [("000010003", "not the caption member")]


def test_corrupt_shard_is_an_error_naming_it(tmp_path):
    shard = tmp_path / "broken.tar"
    shard.write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(QuestionerError, match="broken.tar is not a readable tar shard"):
        records([shard])


def test_unreadable_inputs_are_named(tmp_path):
    with pytest.raises(UsageError, match="cannot read .*missing.txt"):
        check_readable([tmp_path / "missing.txt"])
    with pytest.raises(UsageError, match="is a directory"):
        check_readable([tmp_path])
    with pytest.raises(UsageError, match="no input files"):
        check_readable([])
    with pytest.raises(UsageError, match="--input-format"):
        CaptionReader([tmp_path / "x"], input_format="csv")


@pytest.mark.parametrize(
    "name, fmt",
    [("a.tar", "wds"), ("a.tar.gz", "wds"), ("a.jsonl", "jsonl"), ("A.JSON", "jsonl"),
     ("a.tsv", "tsv"), ("a.txt", "text"), ("a", "text")],
)
def test_detect_format(name, fmt):
    assert detect_format(name) == fmt
