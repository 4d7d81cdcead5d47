import gzip
import hashlib
import json
import os
import tarfile

import numpy as np
import pytest

from unigen.data import ImageStore, MultilingualCaptionStream, QAStream, WebdatasetImageTextStream, WikiMatrixStream
from unigen.data.synthetic_world import (
    COLOURS,
    LANGUAGES,
    LEXICONS,
    POSITIONS,
    QUESTION_KINDS,
    SHAPES,
    Scene,
    SceneObject,
    WorldFiles,
    caption,
    question,
    question_answer,
    sample_scene,
    write_synthetic_world,
)


def tree_digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith(".idx"):
                continue  # written later by readers, not by the generator
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            h.update(open(path, "rb").read())
    return h.hexdigest()


def test_deterministic_from_the_seed(tmp_path):
    kw = dict(num_images=30, num_text_pairs=20, num_eval_images=10, shard_size=16)
    a = write_synthetic_world(str(tmp_path / "a"), seed=1, **kw)
    b = write_synthetic_world(str(tmp_path / "b"), seed=1, **kw)
    c = write_synthetic_world(str(tmp_path / "c"), seed=2, **kw)
    assert tree_digest(a.root) == tree_digest(b.root) != tree_digest(c.root)
    assert len(a.image_shards) == 2 and WorldFiles.load(a.root).cc6l == a.cc6l


def test_languages_have_their_own_word_orders():
    scene = Scene((SceneObject("red", "circle", "left"),))
    texts = {lang: caption(scene, lang) for lang in LANGUAGES}
    assert len(set(texts.values())) == len(LANGUAGES) >= 5
    assert texts["en"] == "a red circle on the left"
    # where the colour word sits relative to the shape word differs between languages
    before = {lang: texts[lang].index(LEXICONS[lang].colours["red"])
              < texts[lang].index(LEXICONS[lang].shapes["circle"]) for lang in LANGUAGES}
    assert before["en"] and before["de"] and before["ja"]
    assert not before["fr"] and not before["es"] and not before["sw"]
    # and the position phrase leads in some, trails in others
    assert texts["ja"].startswith(LEXICONS["ja"].positions["left"])
    assert texts["en"].endswith(LEXICONS["en"].positions["left"])
    with pytest.raises(ValueError, match="unknown language 'xx'"):
        caption(scene, "xx")


def test_qa_answers_are_unambiguous_caption_spans():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng)
        q, a = question_answer(scene, rng)
        assert a in caption(scene) and q.endswith("?")
        if q.startswith("where is the "):
            col, shape = q[len("where is the "):-1].split()
            assert sum(o.colour == col and o.shape == shape for o in scene.objects) == 1
        if q.startswith("what color is the "):
            assert sum(o.shape == q[len("what color is the "):-1] for o in scene.objects) == 1
    assert len({o.position for o in sample_scene(rng).objects}) <= len(POSITIONS)


def test_image_free_languages_never_meet_an_image(world):
    image_free = set(world.text_only_languages)
    assert image_free and not image_free & set(world.image_languages)
    with open(world.cc6l) as f:
        cc6l_langs = set().union(*(r["captions"] for r in map(json.loads, f)))
    assert cc6l_langs == {"en", *world.image_languages}
    for shard in world.image_shards:
        with tarfile.open(shard) as tar:
            exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
            assert exts == {"jpg", "txt", "json"}
    # ...but they are in the translation pairs and in the evaluation captions
    wm_langs = {s["lang"] for s in WikiMatrixStream(world.wikimatrix)}
    assert image_free <= wm_langs and set(world.image_languages) <= wm_langs
    with open(world.eval_captions) as f:
        rows = [json.loads(line) for line in f]
    assert all(set(r["captions"]) == set(world.languages) for r in rows)
    assert len(rows) == world.counts["eval_images"]


def test_every_file_is_readable_by_the_real_sources(world):
    store = ImageStore(world.image_shards)
    assert len(list(WebdatasetImageTextStream(world.image_shards))) == world.counts["images"]
    assert len(list(QAStream(world.ccqa, images=store))) == world.counts["images"]
    assert len(list(MultilingualCaptionStream(world.cc6l, images=store))) == world.counts["images"]
    eval_store = ImageStore(world.eval_image_shards)
    assert not set(eval_store.keys()) & set(store.keys())  # held out
    assert len(list(QAStream(world.eval_qa, images=eval_store))) == world.counts["eval_images"]
    n_pairs = world.counts["text_pairs_per_language"] * 5
    assert len(list(WikiMatrixStream(world.wikimatrix))) == n_pairs
    # WikiMatrix names order the pair alphabetically, as the real corpus does
    names = sorted(os.path.basename(p) for p in world.wikimatrix)
    assert "WikiMatrix.de-en.tsv.gz" in names and "WikiMatrix.en-sw.tsv.gz" in names
    with gzip.open(world.wikimatrix[0], "rt") as f:
        assert len(f.readline().rstrip("\n").split("\t")) == 3


def parse_english(text):
    """The scene an English caption describes (inverse of caption(scene, "en"))."""
    en = LEXICONS["en"]
    phrase_to_pos = {v: k for k, v in en.positions.items()}
    objects = []
    for part in text.split(" and "):
        words = part.split()
        assert words[0] == "a", text
        objects.append(SceneObject(words[1], words[2], phrase_to_pos[" ".join(words[3:])]))
    return Scene(tuple(objects))


def _translate_question(english: str, lang: str) -> str | None:
    """The ``lang`` version of an English world question (by search over all questions)."""
    for kind in QUESTION_KINDS:
        for col in COLOURS:
            for shape in SHAPES:
                for pos in POSITIONS:
                    obj = SceneObject(col, shape, pos)
                    if question(kind, obj) == english:
                        return question(kind, obj, lang)
    return None


def test_translation_pairs_are_translations_unless_low_scored(world):
    good = bad = questions = 0
    for s in WikiMatrixStream(world.wikimatrix):
        if s["target_text"].endswith("?"):
            questions += 1
            matches = _translate_question(s["target_text"], s["lang"]) == s["source_text"]
        else:
            matches = caption(parse_english(s["target_text"]), s["lang"]) == s["source_text"]
        if s["score"] >= 1.04:
            assert matches, s
            good += 1
        else:
            bad += not matches
    assert good > 0 and bad > 0  # the planted noise exists and is what min_score removes
    assert questions > 0  # questions are translated too (English is their pivot as well)


def test_eval_questions_in_every_language(world):
    with open(world.eval_qa, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows
    for row in rows:
        assert set(row["questions"]) == set(world.languages)
        assert row["questions"]["en"] == row["question"]
        assert len(set(row["questions"].values())) == len(world.languages)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        write_synthetic_world(str(tmp_path), num_images=0)
    with pytest.raises(ValueError, match="image_size"):
        write_synthetic_world(str(tmp_path), image_size=8)
