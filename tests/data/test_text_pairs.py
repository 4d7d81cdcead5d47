import gzip

import pytest
from data_test_helpers import write_jsonl

from unigen.data import CCLMTextPairStream, DataFormatError, WikiMatrixStream, take


def write_tsv(path, lines, gz=False):
    data = ("\n".join(lines) + "\n").encode()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def test_wikimatrix_columns_follow_file_name(tmp_path):
    de = write_tsv(tmp_path / "WikiMatrix.de-en.tsv.gz",
                   ["1.20\tein roter kreis\ta red circle",
                    "1.10\tein blaues quadrat\ta blue square"],
                   gz=True)
    fr = write_tsv(tmp_path / "WikiMatrix.en-fr.tsv", ["1.30\ta red circle\tun cercle rouge"])
    samples = list(WikiMatrixStream([de, fr]))
    assert [(s["lang"], s["source_text"], s["target_text"]) for s in samples] == [
        ("de", "ein roter kreis", "a red circle"), ("de", "ein blaues quadrat", "a blue square"),
        ("fr", "un cercle rouge", "a red circle")]
    assert samples[0]["task"] == "trans" and samples[0]["score"] == pytest.approx(1.2)
    assert samples[2]["origin"].endswith("WikiMatrix.en-fr.tsv:1")


def test_wikimatrix_min_score_filters_and_counts(tmp_path):
    p = write_tsv(tmp_path / "WikiMatrix.de-en.tsv",
                  ["1.02\tfalsch\twrong", "1.06\tgut\tgood", "0.90\tschlecht\tbad"])
    s = WikiMatrixStream(p, min_score=1.04)
    assert [x["target_text"] for x in s] == ["good"]
    assert s.filtered == 2 and s.skipped.total == 0


@pytest.mark.parametrize("line, message", [
    ("1.1\tonly two columns", "expected 3 tab-separated columns"),
    ("high\tein\ta", "margin score 'high' is not a number"),
])
def test_wikimatrix_malformed_line_names_file_and_line(tmp_path, line, message):
    p = write_tsv(tmp_path / "WikiMatrix.de-en.tsv", ["1.1\tgut\tgood", line])
    with pytest.raises(DataFormatError, match=message) as info:
        list(WikiMatrixStream(p))
    assert info.value.path == p and info.value.line == 2
    assert f"{p}:2" in str(info.value)


def test_wikimatrix_non_strict_skips_malformed_lines_and_counts(tmp_path):
    p = write_tsv(tmp_path / "WikiMatrix.de-en.tsv", ["1.1\tgut\tgood", "junk", "1.2\tja\tyes"])
    s = WikiMatrixStream(p, strict=False)
    assert [x["target_text"] for x in s] == ["good", "yes"]
    assert s.skipped.as_dict() == {"malformed": 1}


def test_wikimatrix_empty_sentence_is_a_counted_skip(tmp_path):
    p = write_tsv(tmp_path / "WikiMatrix.de-en.tsv", ["1.1\t \tgood", "1.2\tja\tyes"])
    s = WikiMatrixStream(p)
    assert [x["target_text"] for x in s] == ["yes"]
    assert s.skipped.as_dict() == {"empty_text": 1}


def test_wikimatrix_bad_names_and_files(tmp_path):
    bad_name = write_tsv(tmp_path / "pairs.tsv", ["1.1\ta\tb"])
    with pytest.raises(DataFormatError, match="WikiMatrix.<lang1>-<lang2>"):
        WikiMatrixStream(bad_name)
    no_english = write_tsv(tmp_path / "WikiMatrix.de-fr.tsv", ["1.1\ta\tb"])
    with pytest.raises(DataFormatError, match="no 'en' side"):
        WikiMatrixStream(no_english)
    with pytest.raises(FileNotFoundError, match="missing.tsv"):
        WikiMatrixStream(str(tmp_path / "missing.tsv"))
    # a truncated gzip stream and invalid utf-8 are malformed files, named with the line
    rows = "\n".join(f"1.1\tsatz {i}\tsentence {i}" for i in range(2000)) + "\n"
    full = gzip.compress(rows.encode())
    trunc = tmp_path / "WikiMatrix.de-en.tsv.gz"
    trunc.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataFormatError, match="truncated gzip") as info:
        list(WikiMatrixStream(str(trunc)))
    assert info.value.path == str(trunc)
    latin = tmp_path / "WikiMatrix.es-en.tsv"
    latin.write_bytes("1.1\tni\u00f1o\tchild\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match="not valid utf-8") as info:
        list(WikiMatrixStream(str(latin)))
    assert info.value.line == 1


def test_cclm_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "cclm.de-en.jsonl", [
        {"source_text": "ein hund", "target_text": "a dog"},
        "",
        {"source_text": "un chat", "target_text": "a cat", "lang": "fr"},
        {"source_text": "", "target_text": "nothing"},
    ])
    s = CCLMTextPairStream(p)
    out = list(s)
    assert [(x["lang"], x["source_text"], x["target_text"]) for x in out] == [
        ("de", "ein hund", "a dog"), ("fr", "un chat", "a cat")]
    assert out[0]["score"] is None and out[1]["origin"] == f"{p}:3"
    assert s.skipped.as_dict() == {"empty_text": 1}


@pytest.mark.parametrize("row, message", [
    ('{"source_text": "a", "target_text": ', "not valid JSON"),
    ('["a", "b"]', "expected a JSON object"),
    ('{"source_text": "a"}', "missing field 'target_text'"),
    ('{"source_text": 3, "target_text": "b"}', "'source_text' must be a string"),
])
def test_cclm_malformed_line_names_file_and_line(tmp_path, row, message):
    p = write_jsonl(tmp_path / "pairs.jsonl", [{"source_text": "x", "target_text": "y"}, row])
    with pytest.raises(DataFormatError, match=message) as info:
        list(CCLMTextPairStream(p))
    assert info.value.line == 2 and f"{p}:2" in str(info.value)


def test_wikimatrix_reads_the_synthetic_world(world):
    s = WikiMatrixStream(world.wikimatrix, min_score=1.04)
    samples = list(s)
    langs = {x["lang"] for x in samples}
    assert langs == set(world.image_languages) | set(world.text_only_languages)
    assert all(x["score"] >= 1.04 for x in samples)
    assert s.filtered > 0  # the world plants low-score noisy pairs
    assert len(take(WikiMatrixStream(world.wikimatrix), 5)) == 5
