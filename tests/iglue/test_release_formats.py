"""IGLUE's released files, quirk by quirk: fixtures written here in the exact formats of the
public IGLUE repository's ``datasets/`` folder (field names, id types, layouts), no model."""

import json
import os
import unicodedata

import pytest
import torch

from unigen.data.errors import DataFormatError
from unigen.iglue.images import AmbiguousImageError, ImageResolver, RecordImages
from unigen.iglue.readers import read_answer_set, read_iglue
from unigen.iglue.scoring import retrieval_metrics
from unigen.scoring import relaxed_match

from .conftest import RGB, reranked, save_image, write_lines

TAMIL_CONCEPT = "26-தைப்பொங்கல்"  # பொ is U+0BCA, which NFD splits in two


def colour(image):
    """The name of the one-colour image's colour (JPEG is lossy: the nearest one)."""
    px = image.getpixel((image.width // 2, image.height // 2))
    return min(RGB, key=lambda c: sum((a - b) ** 2 for a, b in zip(RGB[c], px)))


def marvl_row(lang, concept, left, right, uid, label=True, caption="கீழே"):
    return {"concept": concept, "language": lang, "caption": caption, "left_img": left,
            "right_img": right, "annotator_info": {"annotator_id": f"{lang}_01", "age": 32},
            "chapter": "Time", "id": uid, "label": label}


# ---- xFlickr&CO ---------------------------------------------------------------------------------
def test_xflickrco_empty_caption_is_a_query_and_ids_may_be_integers(tmp_path):
    # As in IGLUE's de/test.jsonl: Flickr30k ids are strings, COCO ids integers, and one record's
    # only caption is the empty string.
    p = write_lines(tmp_path / "test.jsonl", [
        {"sentences": ["Der Mann trägt eine orange Wollmütze."], "id": "1007129816",
         "img_path": "1007129816.jpg"},
        {"sentences": [""], "id": 122239, "img_path": "COCO_val2014_000000122239.jpg"},
        {"sentences": ["Motorradfahrer schaut die Landschaft an."], "id": 391895,
         "img_path": "COCO_val2014_000000391895.jpg"},
    ])
    f = read_iglue("xflickrco", p)
    assert [r.images for r in f.records] == [("1007129816.jpg",),
                                             ("COCO_val2014_000000122239.jpg",),
                                             ("COCO_val2014_000000391895.jpg",)]
    assert f.records[1].texts == ("",) and f.empty_texts == 1
    assert sum(len(r.texts) for r in f.records) == 3  # every caption is a query
    with pytest.raises(DataFormatError, match=r"test\.jsonl:1: 'sentences' must be a non-empty list"):
        read_iglue("xflickrco", write_lines(tmp_path / "test.jsonl", [
            {"sentences": [3], "id": 1, "img_path": "1.jpg"}]))


def test_retrieval_metrics_by_hand():
    # 2 images, 3 captions: captions 0, 1 describe image 0, caption 2 image 1.
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    match = torch.tensor([[0.1, 0.9, 0.95], [0.05, 0.1, 0.9]])

    result = reranked(sim, match)
    m = retrieval_metrics(result, torch.tensor([0, 0, 1]), 2)
    # TR (image → text, over images): by [match] image 0 → caption 2 (wrong), image 1 → 2 (right)
    assert m["tr_r1"] == 0.5
    # IR (text → image, over captions): caption 0 → image 0, 1 → image 0, 2 → image 0 (wrong)
    assert m["ir_r1"] == pytest.approx(2 / 3)
    assert m["r1"] == pytest.approx((0.5 + 2 / 3) / 2)
    # contrastive alone: image 0 → caption 0, image 1 → caption 1 (wrong); caption 1 → image 1
    assert m["tr_r1_contrastive"] == 0.5 and m["ir_r1_contrastive"] == pytest.approx(2 / 3)
    assert (m["images"], m["texts"]) == (2, 3)


# ---- XVNLI / xGQA -------------------------------------------------------------------------------
def test_xvnli_release_lines_and_dash_labels(tmp_path):
    p = write_lines(tmp_path / "test.jsonl", [
        {"gold_label": "contradiction", "sentence1": "رجل في قميص", "sentence2": "يرتدي الجريدة.",
         "captionID": "759822302.jpg#2", "pairID": "759822302.jpg#2r1c", "Flikr30kID": "759822302"},
        {"gold_label": "-", "sentence1": "s", "sentence2": "h", "captionID": "1.jpg#0",
         "pairID": "1.jpg#0r1n", "Flikr30kID": "1"},
    ])
    f = read_iglue("xvnli", p)
    assert f.skipped == 1
    assert [(r.uid, r.images, r.answer) for r in f.records] == [
        ("759822302.jpg#2r1c", ("759822302.jpg",), "no")]


def test_xgqa_few_shot_file_and_closed_answer_set(tmp_path):
    p = tmp_path / "train_5.json"
    p.write_text(json.dumps({"20902594": {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "backpack (1)"}],
        "entailed": ["20902539"], "equivalent": ["20902594"],
        "question": "Scheint der Rucksack sauber und blau zu sein?", "imageId": "n411121",
        "isBalanced": True, "groups": {"global": None, "local": "13-backpack_clean"},
        "answer": "yes", "semanticStr": "select: backpack (1)", "annotations": {},
        "types": {"detailed": "verifyAttrs"}, "fullAnswer": "Yes, the backpack is clean."}}),
        encoding="utf-8")
    (r,) = read_iglue("xgqa", p).records
    assert (r.uid, r.images, r.answer) == ("20902594", ("n411121.jpg",), "yes")
    labels = tmp_path / "trainval_label2ans.json"
    labels.write_text(json.dumps(["cat food", "elephant", "yes"]))
    assert read_answer_set(labels) == ["cat food", "elephant", "yes"]
    ans2label = tmp_path / "trainval_ans2label.json"
    ans2label.write_text(json.dumps({"yes": 2, "cat food": 0, "elephant": 1}))
    assert read_answer_set(ans2label) == ["cat food", "elephant", "yes"]
    labels.write_text(json.dumps(["a", "", "b"]))
    with pytest.raises(DataFormatError, match="label 1: answer must be a non-empty string"):
        read_answer_set(labels)


def test_zipped_release_file_is_named(tmp_path):
    (tmp_path / "train.jsonl.zip").write_bytes(b"PK")
    with pytest.raises(FileNotFoundError, match=r"unzip .*train\.jsonl\.zip"):
        read_iglue("xvnli", tmp_path / "train.jsonl")


def test_relaxed_match_reports_what_the_paper_adjudicated():
    assert relaxed_match("black cat", "cat") and relaxed_match("The cat.", "cat")
    assert relaxed_match("a big black cat", "black cat")
    assert not relaxed_match("cat", "black cat") and not relaxed_match("catalog", "cat")
    assert not relaxed_match("cat black", "black cat")


# ---- MaRVL: the release layout ------------------------------------------------------------------
@pytest.fixture
def marvl_release(tmp_path):
    """<root>/<language>/images/<concept>/<file>, with 7-8.jpg in both languages (other
    pictures), the Tamil concept folder stored in NFD and a Chinese one in NFKD."""
    root = tmp_path / "marvl-images"
    save_image(root, "id/images/39-Panci/7-8.jpg", "red")
    save_image(root, "id/images/39-Panci/39-n-5.jpg", "green")
    tamil_on_disk = unicodedata.normalize("NFD", TAMIL_CONCEPT)
    assert tamil_on_disk != TAMIL_CONCEPT
    save_image(root, f"ta/images/{tamil_on_disk}/7-8.jpg", "blue")
    save_image(root, f"ta/images/{tamil_on_disk}/26-3.jpg", "green")
    save_image(root, f"zh/images/{unicodedata.normalize('NFKD', '１-饺子')}/1-2.jpg", "green")
    return root


def test_marvl_images_follow_language_and_concept(tmp_path, marvl_release):
    p = write_lines(tmp_path / "marvl-ta.jsonl", [
        marvl_row("ta", TAMIL_CONCEPT, "7-8.jpg", "26-3.jpg", "ta-0"),
        marvl_row("id", "39-Panci", "39-Panci/7-8.jpg", "39-Panci/39-n-5.jpg", "id-0", False,
                  "Terdapat tutup panci"),  # few-shot files name the concept folder too
        marvl_row("zh", "１-饺子", "1-2.jpg", "1-2.jpg", "zh-0"),
    ])
    f = read_iglue("marvl", p)
    ta, id_, zh = f.records
    assert (ta.language, ta.concept, ta.answer) == ("ta", TAMIL_CONCEPT, "yes")
    assert id_.answer == "no" and ta.images != id_.images  # same file name, two images
    r = ImageResolver(marvl_release)
    ta_left, _ = r.paths(ta)
    id_left, _ = r.paths(id_)
    assert ta_left.endswith("7-8.jpg") and id_left.endswith("7-8.jpg") and ta_left != id_left
    assert colour(r.open_rgb(ta_left)) == "blue" and colour(r.open_rgb(id_left)) == "red"
    assert r.paths(zh)[0].endswith("1-2.jpg")  # concept folder found across NFKC
    images = RecordImages(f.records, r, 8, p)
    assert len(images) == 3 and images[0].shape == (3, 8, 8)
    # the name alone is ambiguous: an error naming both files, never the first one found
    with pytest.raises(AmbiguousImageError, match=r"'7-8.jpg' matches 2 files.*id.*ta|ta.*id"):
        r.path("7-8.jpg")


def test_marvl_missing_image_names_the_record_and_the_layout(tmp_path, marvl_release):
    p = write_lines(tmp_path / "marvl-id.jsonl", [
        marvl_row("id", "39-Panci", "7-8.jpg", "39-n-5.jpg", "id-0"),
        marvl_row("id", "40-Bakso", "1.jpg", "2.jpg", "id-1"),
        marvl_row("sw", "1-Ugali", "1.jpg", "2.jpg", "sw-0"),
    ])
    f = read_iglue("marvl", p)
    r = ImageResolver(marvl_release)
    with pytest.raises(FileNotFoundError, match=r"marvl-id\.jsonl:2: MaRVL image '1.jpg' not "
                                                r"found: no concept folder .*40-Bakso.*and 1 more"):
        r.check(p, f.records)
    with pytest.raises(DataFormatError, match="missing field 'concept'"):
        read_iglue("marvl", write_lines(tmp_path / "x.jsonl", [
            {"language": "id", "caption": "c", "left_img": "a", "right_img": "b", "label": True}]))


def test_ambiguous_nlvr2_name_is_an_error_naming_the_candidates(tmp_path):
    save_image(tmp_path, "train/17/train-1-0-img0.png", "red")
    save_image(tmp_path, "dev/3/train-1-0-img0.png", "blue")
    save_image(tmp_path, "train/17/train-1-0-img1.png", "blue")
    p = write_lines(tmp_path / "train.jsonl", [
        {"sentence": "The left image shows a dog.", "identifier": "train-1-0-0", "label": "True",
         "writer": "61", "synset": "dog", "query": "dog12", "left_url": "u", "right_url": "v"}])
    f = read_iglue("marvl", p)
    assert f.records[0].images == ("train-1-0-img0.png", "train-1-0-img1.png")
    with pytest.raises(AmbiguousImageError, match=r"train\.jsonl:1: image 'train-1-0-img0.png' "
                                                  r"matches 2 files.*dev/3.*train/17"):
        ImageResolver(tmp_path).check(p, f.records)


def test_undecodable_image_is_named(tmp_path):
    (tmp_path / "1.jpg").write_bytes(b"not a jpeg")
    r = ImageResolver(tmp_path)
    with pytest.raises(ValueError, match=r"image '.*1\.jpg' cannot be decoded"):
        r.tensor(("1.jpg",), 8)


# ---- WIT ----------------------------------------------------------------------------------------
def wit_line(ix, url, caption, lang="ar", idx=19):
    return {"image_idx": idx, "image_url": url, "meta_url": url.replace("upload", "commons"),
            "caption_reference_description": caption, "language": lang,
            "page_url": f"https://{lang}.wikipedia.org/wiki/X", "wit_ix": ix}


def test_wit_lines_group_into_images_with_several_captions(tmp_path):
    url = "https://upload.wikimedia.org/wikipedia/commons/e/e2/B%C3%A9ja%C3%AFa_nature.jpg"
    p = write_lines(tmp_path / "test_ar.jsonl", [
        wit_line("wit-test_3", "https://upload.wikimedia.org/wikipedia/commons/6/61/BNRATHAU.jpg",
                 "دار البلدية القديمة في بون"),
        wit_line("wit-test_31", url, "برج موسى في بجاية"),
        wit_line("wit-test_3", "https://upload.wikimedia.org/wikipedia/commons/6/61/BNRATHAU.jpg",
                 "بون"),
        wit_line("wit-test_31", url, ""),
    ])
    f = read_iglue("wit", p)
    assert [(r.uid, r.texts) for r in f.records] == [
        ("wit-test_3", ("دار البلدية القديمة في بون", "بون")),
        ("wit-test_31", ("برج موسى في بجاية", ""))]
    assert f.empty_texts == 1
    # found by wit_ix as the stem (any extension), else by image_url's decoded file name
    save_image(tmp_path / "wit", "a/wit-test_3.png", "red")
    save_image(tmp_path / "wit", "b/Béjaïa_nature.jpg", "blue")
    r = ImageResolver(tmp_path / "wit")
    files = r.check(p, f.records)
    assert files[0][0].endswith("wit-test_3.png") and files[1][0].endswith("Béjaïa_nature.jpg")
    save_image(tmp_path / "wit", "c/wit-test_3.jpg", "red")
    with pytest.raises(AmbiguousImageError, match="'wit-test_3' matches 2 files"):
        ImageResolver(tmp_path / "wit").check(p, f.records)
    os.remove(tmp_path / "wit" / "b" / "Béjaïa_nature.jpg")
    os.remove(tmp_path / "wit" / "c" / "wit-test_3.jpg")
    with pytest.raises(FileNotFoundError, match=r"test_ar\.jsonl:2: WIT image 'wit-test_31' not "
                                                r"found.*'Béjaïa_nature\.jpg'"):
        ImageResolver(tmp_path / "wit").check(p, f.records)
    with pytest.raises(DataFormatError, match=r":2: wit_ix 'wit-test_3' names image"):
        read_iglue("wit", write_lines(tmp_path / "bad.jsonl", [
            wit_line("wit-test_3", "https://x/a.jpg", "a"),
            wit_line("wit-test_3", "https://x/b.jpg", "b")]))
    with pytest.raises(DataFormatError, match="missing field 'caption_reference_description'"):
        read_iglue("wit", write_lines(tmp_path / "bad.jsonl", [
            {"wit_ix": "wit_1", "image_url": "https://x/a.jpg"}]))
