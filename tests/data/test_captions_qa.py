import json

import pytest
from data_test_helpers import write_jsonl

from unigen.data import DataFormatError, ImageStore, MultilingualCaptionStream, QAStream


@pytest.fixture(scope="module")
def store(world):
    return ImageStore(world.image_shards)


def test_cc6l_mostly_english_with_a_seeded_multilingual_fraction(world, store):
    s = MultilingualCaptionStream(world.cc6l, images=store, multilingual_fraction=0.3, seed=3)
    samples = list(s)
    assert len(samples) == world.counts["images"] and s.skipped.total == 0
    non_en = [x for x in samples if x["lang"] != "en"]
    # 120 images at 30%: a binomial count well inside [15, 60]
    assert 15 <= len(non_en) <= 60
    assert {x["lang"] for x in non_en} <= set(world.image_languages)
    with open(world.cc6l) as f:
        rows = {r["key"]: r["captions"] for r in map(json.loads, f)}
    for x in samples:
        assert x["caption"] == rows[x["key"]][x["lang"]]
        assert x["english_caption"] == rows[x["key"]]["en"]
        assert x["task"] == "match" and x["image"] == store[x["key"]]
    # the choice is a function of (seed, key): the same again, another seed differs
    again = list(MultilingualCaptionStream(world.cc6l, images=store, multilingual_fraction=0.3,
                                           seed=3))
    assert [x["lang"] for x in again] == [x["lang"] for x in samples]
    other = list(MultilingualCaptionStream(world.cc6l, images=store, multilingual_fraction=0.3,
                                           seed=4))
    assert [x["lang"] for x in other] != [x["lang"] for x in samples]


def test_cc6l_fraction_extremes_and_language_restriction(world, store):
    none = list(MultilingualCaptionStream(world.cc6l, images=store, multilingual_fraction=0.0))
    assert {x["lang"] for x in none} == {"en"}
    only_ja = list(MultilingualCaptionStream(world.cc6l, images=store, multilingual_fraction=1.0,
                                             languages=["ja"]))
    assert {x["lang"] for x in only_ja} == {"ja"}
    with pytest.raises(ValueError, match="multilingual_fraction"):
        MultilingualCaptionStream(world.cc6l, images=store, multilingual_fraction=1.5)


def test_cc6l_all_languages_uses_every_caption_of_every_image(world, store):
    """Table 2's "100% CC6L": each image once per caption language, the position exact."""
    langs = ("en",) + tuple(world.image_languages)
    s = MultilingualCaptionStream(world.cc6l, images=store, all_languages=langs)
    samples = list(s)
    with open(world.cc6l) as f:
        rows = {r["key"]: r["captions"] for r in map(json.loads, f)}
    expected = {(k, lang) for k, caps in rows.items() for lang in caps if lang in langs}
    assert {(x["key"], x["lang"]) for x in samples} == expected
    assert len(samples) == len(expected)
    assert all(x["caption"] == rows[x["key"]][x["lang"]] for x in samples)
    # a language no line has is filtered, not an error; resuming mid-way continues exactly
    s = MultilingualCaptionStream(world.cc6l, images=store, all_languages=("en", "xx"))
    assert len(list(s)) == len(rows) and s.filtered == len(rows)
    s = MultilingualCaptionStream(world.cc6l, images=store, all_languages=langs)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    resumed = MultilingualCaptionStream(world.cc6l, images=store, all_languages=langs)
    resumed.load_state_dict(s.state_dict())
    assert [(x["key"], x["lang"]) for x in head + list(resumed)] == [
        (x["key"], x["lang"]) for x in samples]
    with pytest.raises(ValueError, match="all_languages"):
        MultilingualCaptionStream(world.cc6l, images=store, all_languages=("de",))


def test_cc6l_flat_form_missing_image_and_malformed_lines(tmp_path, world, store):
    key = next(iter(store.keys()))
    p = write_jsonl(tmp_path / "cc6l.jsonl", [
        {"key": key, "en": "a red circle", "de": "links ist ein roter kreis"},
        {"key": "no-such-key", "captions": {"en": "x"}},
    ])
    s = MultilingualCaptionStream(p, images=store, multilingual_fraction=1.0)
    out = list(s)
    assert len(out) == 1 and out[0]["lang"] == "de"
    assert s.skipped.as_dict() == {"missing_image": 1}
    for row, message in [({"key": key, "captions": {"de": "nur deutsch"}}, "no 'en' caption"),
                         ({"captions": {"en": "x"}}, "missing field 'key'"),
                         ({"key": key, "captions": ["en", "x"]}, "must be an object"),
                         ({"key": key, "captions": {"en": 5}}, "must be a string")]:
        bad = write_jsonl(tmp_path / "bad.jsonl", [{"key": key, "en": "fine"}, row])
        with pytest.raises(DataFormatError, match=message) as info:
            list(MultilingualCaptionStream(bad, images=store))
        assert info.value.line == 2 and info.value.path == bad


def test_qa_reads_the_questioner_format(world, store):
    s = QAStream(world.ccqa, images=store)
    samples = list(s)
    assert len(samples) == world.counts["images"]
    for x in samples:
        assert x["task"] == "qus" and x["question"].endswith("?")
        assert x["answer"] in x["caption"]  # the world's answers are caption spans
        assert x["image"] == store[x["key"]]


def test_qa_corrupt_and_malformed(tmp_path, store):
    key = next(iter(store.keys()))
    p = write_jsonl(tmp_path / "qa.jsonl", [
        {"key": key, "caption": "a red circle", "question": "what color?", "answer": "red"},
        {"key": "gone", "question": "q?", "answer": "a"},
        {"key": key, "question": "  ", "answer": "a"},
        {"key": key, "question": "what shape?", "answer": "circle"},
    ])
    s = QAStream(p, images=store)
    assert [x["answer"] for x in s] == ["red", "circle"]
    assert s.skipped.as_dict() == {"missing_image": 1, "empty_text": 1}
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"key": key, "question": "q?", "answer": "a"}, {"key": key, "question": "q?"}])
    with pytest.raises(DataFormatError, match="missing field 'answer'") as info:
        list(QAStream(bad, images=store))
    assert f"{bad}:2" in str(info.value)
