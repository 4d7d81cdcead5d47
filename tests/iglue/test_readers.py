"""IGLUE's readers, image resolution and the retrieval metric, on files written here in
IGLUE's formats with tiny images."""

import json
import os

import pytest
import torch

from unigen.data.errors import DataFormatError
from unigen.iglue.images import ImageResolver
from unigen.iglue.readers import read_iglue
from unigen.scoring import recall_at_1

from .conftest import RGB, reranked, save_image, write_lines


# ---- readers ------------------------------------------------------------------------------------
def test_xvnli_keywords_and_skipped_labels(tmp_path):
    p = write_lines(tmp_path / "train.jsonl", [
        {"gold_label": "entailment", "sentence2": "El hombre está sentado.", "pairID": "1r1e",
         "Flikr30kID": "4868221344"},
        {"gold_label": "-", "sentence2": "Una mujer sube.", "pairID": "2r1c", "Flikr30kID": "3897"},
        "",
        {"gold_label": "contradiction", "sentence2": "De pie.", "pairID": "1r1c",
         "Flikr30kID": "4868221344"},
        {"gold_label": "neutral", "sentence2": "Casados.", "Flikr30kID": 42},
    ])
    f = read_iglue("xvnli", p)
    assert f.skipped == 1
    assert [(r.uid, r.images, r.texts, r.answer) for r in f.records] == [
        ("1r1e", ("4868221344.jpg",), ("El hombre está sentado.",), "yes"),
        ("1r1c", ("4868221344.jpg",), ("De pie.",), "no"),
        ("train.jsonl:5", ("42.jpg",), ("Casados.",), "maybe")]


def test_xgqa_marvl_nlvr2_and_xflickrco(tmp_path):
    p = tmp_path / "q.json"
    p.write_text(json.dumps({"202158849": {"question": "Ist der Bus schwarz?", "imageId": "n406334",
                                           "answer": "no", "semantic": []}}))
    (r,) = read_iglue("xgqa", p).records
    assert (r.uid, r.images, r.texts, r.answer) == ("202158849", ("n406334.jpg",),
                                                    ("Ist der Bus schwarz?",), "no")
    p = write_lines(tmp_path / "m.jsonl", [
        {"concept": "39-Panci", "caption": "Terdapat tutup panci", "left_img": "39-Panci/39-n-5.jpg",
         "right_img": "39-Panci/39-n-2.jpg", "id": "id-0", "label": True, "language": "id"},
        {"identifier": "dev-850-0-1", "sentence": "Gambar kanan", "label": "False"}])
    a, b = read_iglue("marvl", p).records
    assert (a.uid, a.images, a.answer) == ("id-0", ("id/39-Panci/39-n-5.jpg", "id/39-Panci/39-n-2.jpg"),
                                           "yes")
    assert (a.language, a.concept) == ("id", "39-Panci")
    assert (b.uid, b.images, b.texts, b.answer) == (
        "dev-850-0-1", ("dev-850-0-img0.png", "dev-850-0-img1.png"), ("Gambar kanan",), "no")
    p = write_lines(tmp_path / "x.jsonl", [
        {"sentences": ["Un equipo de baloncesto."], "id": "3497238310", "img_path": "3497238310.jpg"},
        {"sentences": ["a", "b"], "id": 7}])
    a, b = read_iglue("xflickrco", p).records
    assert (a.images, a.texts, a.answer) == (("3497238310.jpg",), ("Un equipo de baloncesto.",), None)
    assert (b.images, b.texts) == (("7.jpg",), ("a", "b"))


@pytest.mark.parametrize("task,rows,message", [
    ("xvnli", ["{not json"], r"x\.jsonl:1: not a JSON line"),
    ("xvnli", [{"gold_label": "neutral", "sentence2": "s"}], r"x\.jsonl:1: missing field 'Flikr30kID'"),
    ("xvnli", [{"gold_label": "neutral", "sentence2": " ", "Flikr30kID": "1"}],
     r"field 'sentence2' must be a non-empty string"),
    ("xvnli", [{"gold_label": "-", "sentence2": "s", "Flikr30kID": "1"}],
     r"no usable xvnli records \(1 skipped"),
    ("marvl", [{"caption": "c", "left_img": "l", "right_img": "r", "label": "maybe",
                "language": "id", "concept": "1-A"}],
     r"label must be true/false"),
    ("xflickrco", [{"img_path": "a.jpg", "sentences": []}], r"'sentences' must be a non-empty list"),
    ("xvnli", [[1, 2]], r"expected a JSON object"),
])
def test_malformed_files_name_file_and_line(tmp_path, task, rows, message):
    with pytest.raises(DataFormatError, match=message):
        read_iglue(task, write_lines(tmp_path / "x.jsonl", rows))


def test_reader_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="task must be one of"):
        read_iglue("vqa", tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        read_iglue("xgqa", tmp_path / "missing.json")
    p = tmp_path / "q.json"
    p.write_text(json.dumps({"1": {"imageId": "a", "answer": "no"}}))
    with pytest.raises(DataFormatError, match="question 1: missing field 'question'"):
        read_iglue("xgqa", p)


# ---- images -------------------------------------------------------------------------------------
def test_resolver_finds_nested_images_and_puts_pairs_side_by_side(tmp_path):
    save_image(tmp_path, "train/17/left.png", "red", size=(20, 10))
    save_image(tmp_path, "right.png", "blue", size=(10, 20))
    r = ImageResolver(tmp_path)
    assert r.path("left.png") == os.path.join(tmp_path, "train/17/left.png")  # by name, below root
    pair = r.load(("left.png", "right.png"))
    assert pair.size == (20 + 5, 10)  # the right image scaled to the left one's height
    assert pair.getpixel((2, 5)) == RGB["red"] and pair.getpixel((23, 5)) == RGB["blue"]
    t = r.tensor(("left.png", "right.png"), 8)
    assert t.shape == (3, 8, 8) and t.dtype == torch.uint8
    left, right = t[:, 4, 0].int(), t[:, 4, 7].int()  # bicubic: close to the colours, not exact
    assert (left - torch.tensor(RGB["red"])).abs().max() < 20
    assert (right - torch.tensor(RGB["blue"])).abs().max() < 20
    with pytest.raises(FileNotFoundError, match="'nope.jpg' is neither at"):
        r.path("nope.jpg")
    with pytest.raises(FileNotFoundError, match="image root"):
        ImageResolver(tmp_path / "none")


def test_recall_at_1_with_several_captions_per_image():
    # 2 images, 3 captions: captions 0, 1 describe image 0, caption 2 image 1.
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.7]])
    match = torch.tensor([[0.1, 0.9, 0.95], [0.05, 0.1, 0.9]])

    result = reranked(sim, match)
    correct = torch.tensor([[True, True, False], [False, False, True]])
    s = recall_at_1(result, correct)
    assert s.i2t_contrastive == 0.5  # image 1's most similar caption (1) is image 0's
    assert s.i2t_rerank == 0.5  # [match] sends image 0 to caption 2
    assert s.t2i_contrastive == pytest.approx(2 / 3)  # caption 1 → image 1: wrong
    assert s.t2i_rerank == pytest.approx(2 / 3)  # caption 1 fixed, caption 2 → image 0 now
    assert s.i2t_chance == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert s.t2i_chance == pytest.approx(0.5)
