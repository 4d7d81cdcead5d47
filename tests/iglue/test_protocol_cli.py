"""Every IGLUE task fine-tuned and scored end to end through the command lines, on a small
copy of IGLUE's ``datasets/`` folder written here (the release's paths, field names and quirks)
with one-colour images laid out as their sources distribute them; then the few-shot runner
(resumable) and the Table 1 renderer. Tiny model, one epoch: these test the plumbing, not the
learning (tests/iglue/test_finetune_evaluate.py tests that a task is learnt)."""

import json
import os
import unicodedata

import pytest
import torch

from unigen.configuration import config_from_argv, save_config
from unigen.data.prepare import main as prepare
from unigen.data.synthetic_text import synthetic_corpus
from unigen.evaluate import main as evaluate_main
from unigen.finetune import main as finetune_main
from unigen.iglue.fewshot import FewshotConfig, run_fewshot
from unigen.iglue.fewshot import main as fewshot_main
from unigen.iglue.finetune import parse_args as finetune_args
from unigen.iglue.protocol import PROTOCOLS
from unigen.iglue.table import main as table_main
from unigen.model.pretrained import read_weights
from unigen.model.tokenizers import train_tiny_tokenizers
from unigen.model.unigen_model import UniGen

from .conftest import save_image, write_lines

COLOURS = ("red", "blue", "green")
WORDS = {"en": COLOURS, "ar": ("أحمر", "أزرق", "أخضر"), "es": ("rojo", "azul", "verde"),
         "de": ("rot", "blau", "grün"), "ta": ("சிவப்பு", "நீலம்", "பச்சை"),
         "id": ("merah", "biru", "hijau")}
TAMIL_CONCEPT = "26-தைப்பொங்கல்"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(root, pre-trained model dir, IGLUE datasets dir, image roots)."""
    root = tmp_path_factory.mktemp("release")
    tok = train_tiny_tokenizers(synthetic_corpus(), root / "tok", text_vocab_size=300,
                                decoder_vocab_size=300)
    UniGen.tiny(tok).save_pretrained(root / "pre")
    ds, img = root / "datasets", root / "images"
    roots = {"flickr": img / "flickr30k-images", "coco": img / "val2014", "gqa": img / "gqa",
             "nlvr2": img / "nlvr2", "marvl": img / "marvl-images", "wit": img / "wit"}

    def ann(rel, rows):
        os.makedirs(os.path.dirname(ds / rel), exist_ok=True)
        if rel.endswith(".json"):
            (ds / rel).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
        else:
            write_lines(ds / rel, [json.dumps(r, ensure_ascii=False) for r in rows])

    for i in range(12):
        save_image(roots["flickr"], f"{1000 + i}.jpg", COLOURS[i % 3])
        save_image(roots["coco"], f"COCO_val2014_{i:012d}.jpg", COLOURS[i % 3])
        save_image(roots["gqa"], f"n{i}.jpg", COLOURS[i % 3])

    # XVNLI: Flickr30k ids, "-" labels
    labels = ("entailment", "contradiction", "neutral")

    def xvnli(lang, n, start=0):
        return [{"gold_label": "-" if i == 5 else labels[i % 3], "sentence1": "p",
                 "sentence2": f"{WORDS.get(lang, COLOURS)[i % 3]}", "captionID": f"{1000 + i}.jpg#0",
                 "pairID": f"{1000 + i}.jpg#0r{i}", "Flikr30kID": str(1000 + i)}
                for i in range(start, start + n)]

    p = PROTOCOLS["xvnli"]
    ann(p.train, xvnli("en", 8))
    ann(p.dev, xvnli("en", 4))
    for lang in ("ar", "es"):
        ann(p.test_file(lang), xvnli(lang, 6))
        for shot in ("1", "5"):
            ann(p.train_file(lang, shot), xvnli(lang, int(shot), 6))

    # xGQA: GQA question JSON
    def gqa(lang, n):
        return {str(20902594 + i): {"question": f"{WORDS.get(lang, COLOURS)[0]}?", "imageId": f"n{i}",
                                    "answer": COLOURS[i % 3], "isBalanced": True, "semantic": []}
                for i in range(n)}

    p = PROTOCOLS["xgqa"]
    ann(p.train, gqa("en", 8))
    ann(p.dev, gqa("en", 3))
    ann(p.test_file("de"), gqa("de", 6))
    ann("gqa/annotations/trainval_label2ans.json", ["blue", "green", "red", "cat"])

    # NLVR2 train/dev (nested numbered folders) and MaRVL test (the release layout, names
    # repeating across languages, the Tamil concept folder in NFD)
    def nlvr2(split, n):
        rows = []
        for i in range(n):
            for side in (0, 1):
                save_image(roots["nlvr2"], f"{split}/{i % 3}/{split}-{i}-0-img{side}.png",
                           COLOURS[(i + side) % 3])
            rows.append({"sentence": "The left image is red.", "identifier": f"{split}-{i}-0-0",
                         "label": "True" if i % 3 == 0 else "False", "writer": "61"})
        return rows

    p = PROTOCOLS["marvl"]
    ann(p.train, nlvr2("train", 6))
    ann(p.dev, nlvr2("dev", 3))
    for lang, concept in (("id", "39-Panci"), ("ta", TAMIL_CONCEPT)):
        folder = unicodedata.normalize("NFD", concept)
        for i in range(4):
            save_image(roots["marvl"], f"{lang}/images/{folder}/{i}.jpg",
                       COLOURS[(i + (lang == "ta")) % 3])
        ann(p.test_file(lang), [
            {"concept": concept, "language": lang, "caption": WORDS[lang][i % 3],
             "left_img": f"{i}.jpg", "right_img": f"{(i + 1) % 4}.jpg",
             "annotator_info": {"annotator_id": f"{lang}_01"}, "chapter": "Time",
             "id": f"{lang}-{i}", "label": i % 2 == 0} for i in range(4)])
    ann(p.train_file("id", "2"), [
        {"concept": "39-Panci", "language": "id", "caption": WORDS["id"][i], "left_img": f"{i}.jpg",
         "right_img": f"{i + 2}.jpg", "id": f"id-train-{i}", "label": i == 0} for i in range(2)])

    # xFlickr&CO: Flickr30k training; a test with COCO integer ids and an empty caption
    p = PROTOCOLS["xflickrco"]
    flickr = [{"sentences": [f"a {c} thing", f"it is {c}"], "id": str(1000 + i),
               "img_path": f"{1000 + i}.jpg"} for i, c in zip(range(6), COLOURS * 2)]
    ann(p.train, flickr + [{"sentences": [""], "id": "1006", "img_path": "1006.jpg"}])
    ann(p.dev, flickr[:3])
    ann(p.test_file("de"), [
        {"sentences": ["rot"], "id": "1000", "img_path": "1000.jpg"},
        {"sentences": ["blau"], "id": "1001", "img_path": "1001.jpg"},
        {"sentences": [""], "id": 1, "img_path": "COCO_val2014_000000000001.jpg"},
        {"sentences": ["grün"], "id": 2, "img_path": "COCO_val2014_000000000002.jpg"}])
    ann(p.train_file("de", "1"), [{**flickr[0], "sentences": flickr[0]["sentences"][:1]}])
    ann(p.train_file("de", "5"), [{**r, "sentences": r["sentences"][:1]} for r in flickr[:5]])

    # WIT: one caption a line, several lines per image; images by wit_ix or image_url's name
    p = PROTOCOLS["wit"]

    def wit(split, n, lang="en"):
        rows = []
        for i in range(n):
            ix, url = f"wit-{split}_{i}", f"https://upload.wikimedia.org/x/{i}/B%C3%A9ja_{split}{i}.jpg"
            if i % 2:
                save_image(roots["wit"], f"{split}/{ix}.png", COLOURS[i % 3])
            else:
                save_image(roots["wit"], f"{split}/Béja_{split}{i}.jpg", COLOURS[i % 3])
            for c in range(1 + i % 2):
                rows.append({"image_idx": i, "image_url": url, "meta_url": url,
                             "caption_reference_description": f"{COLOURS[i % 3]} {c}",
                             "language": lang, "page_url": "https://x", "wit_ix": ix})
        return rows

    ann(p.train, wit("train", 6))
    ann(p.dev, wit("val", 3))
    ann(p.test_file("ar"), wit("test", 4, "ar"))
    return root, root / "pre", ds, roots


def _run(main, argv):
    assert main([str(a) for a in argv]) == 0


@pytest.mark.parametrize("task", ["xvnli", "xgqa", "marvl", "xflickrco", "wit"])
def test_every_task_fine_tunes_and_scores_through_the_clis(release, task, tmp_path, capsys):
    root, pre, ds, roots = release
    p = PROTOCOLS[task]
    lang = {"xvnli": "ar", "xgqa": "de", "marvl": "ta", "xflickrco": "de", "wit": "ar"}[task]
    train_images = {"xvnli": roots["flickr"], "xgqa": roots["gqa"], "marvl": roots["nlvr2"],
                    "xflickrco": roots["flickr"], "wit": roots["wit"]}[task]
    test_images = {"marvl": roots["marvl"], "xflickrco": roots["flickr"].parent}.get(task, train_images)
    extra = ["--trainable", "decoder", "--decode", "rank", "--answers",
             ds / "gqa/annotations/trainval_label2ans.json"] if task == "xgqa" else []
    run = tmp_path / "run"
    _run(finetune_main, ["--task", task, "--model", pre, "--train", ds / p.train, "--dev", ds / p.dev,
                         "--images", train_images, "--out", run, "--epochs", 1, "--batch-size", 4,
                         "--workers", 0, "--device", "cpu", "--k", 2, *extra])
    assert os.path.isfile(run / "model" / "config.json")
    dev_line = [json.loads(line) for line in open(run / "metrics.jsonl") if '"dev"' in line][0]
    assert dev_line["dev"]["epoch"] == 1
    out = tmp_path / "scores.json"
    _run(evaluate_main, ["--task", task, "--model", run / "model", "--test", f"{lang}={ds / p.test_file(lang)}",
                         "--images", test_images, "--out", out, "--workers", 0, "--device", "cpu",
                         "--k", 2, *extra[2:]])
    printed = capsys.readouterr().out
    assert "images/s" in printed and "ETA" in printed  # progress on long files
    if task == "xflickrco":  # an empty training caption is said, not trained on
        assert "(1 empty captions, not trained on)" in printed
    scores = json.load(open(out))["results"]
    m = scores[lang]
    assert m["seconds"] > 0 and m["records_per_second"] > 0
    if task in ("xflickrco", "wit"):
        # every image in the gallery, every caption a query, the empty one included
        assert (m["images"], m["texts"]) == ((4, 4) if task == "xflickrco" else (4, 6))
        assert m["empty_texts"] == (1 if task == "xflickrco" else 0)
        for key in ("ir_r1", "tr_r1", "ir_r1_contrastive", "tr_r1_contrastive"):
            assert 0.0 <= m[key] <= 1.0
        assert m["r1"] == pytest.approx((m["ir_r1"] + m["tr_r1"]) / 2)
        assert scores["mean_ir_r1"] == m["ir_r1"] and scores["mean_tr_r1"] == m["tr_r1"]
    else:
        assert 0.0 <= m["accuracy"] <= m["relaxed_accuracy"] <= 1.0
        assert m["n"] == {"xvnli": 5, "xgqa": 6, "marvl": 4}[task]
        assert m["skipped"] == (1 if task == "xvnli" else 0)  # the "-" label
    if task == "xgqa":
        # decoder-only: the encoders are the pre-trained ones, the decoder moved
        a, b = read_weights(pre / "model.safetensors"), read_weights(run / "model" / "model.safetensors")
        enc = [n for n in a if n.startswith(("image_encoder.qformer", "text_encoder", "image_proj"))]
        dec = [n for n in a if n.startswith("decoder.") and not torch.equal(a[n], b[n])]
        assert enc and all(torch.equal(a[n], b[n]) for n in enc) and dec
        assert m["answer_not_in_set"] == 0.0


def test_evaluation_stops_on_a_missing_or_undecodable_image(release, tmp_path, capsys):
    root, pre, ds, roots = release
    p = PROTOCOLS["marvl"]
    args = ["--task", "marvl", "--model", pre, "--test", ds / p.test_file("id"), "--workers", 0,
            "--device", "cpu"]
    # MaRVL's images are found in the record's language folder only: NLVR2's root has none
    assert evaluate_main([str(a) for a in args + ["--images", roots["nlvr2"]]]) == 2
    assert "marvl-id.jsonl:1: MaRVL image '0.jpg' not found: no language folder" in \
        capsys.readouterr().err
    broken = tmp_path / "marvl-images"
    os.makedirs(broken / "id" / "images" / "39-Panci")
    for i in range(4):
        (broken / "id" / "images" / "39-Panci" / f"{i}.jpg").write_bytes(b"truncated")
    assert evaluate_main([str(a) for a in args + ["--images", broken]]) == 2
    err = capsys.readouterr().err
    assert f"image '{broken / 'id' / 'images' / '39-Panci' / '0.jpg'}' cannot be decoded" in err


def test_fewshot_runner_resumes_and_table_renders(release, tmp_path):
    root, pre, ds, roots = release
    out = tmp_path / "iglue"
    common = ["--model", pre, "--iglue", ds, "--out", out, "--epochs", 1, "--few-shot-epochs", 1,
              "--batch-size", 4, "--workers", 0, "--device", "cpu"]
    xvnli = ["--task", "xvnli", "--images", roots["flickr"], "--languages", "ar", "es",
             "--shots", "1", "5", "--dev", "false"]
    _run(fewshot_main, [*xvnli, *common])
    results = out / "results" / "xvnli"
    files = sorted(os.path.relpath(os.path.join(d, f), results)
                   for d, _, fs in os.walk(results) for f in fs)
    assert files == ["few_shot/1/ar.json", "few_shot/1/es.json", "few_shot/5/ar.json",
                     "few_shot/5/es.json", "zero_shot/ar.json", "zero_shot/es.json"]
    cell = json.load(open(results / "few_shot" / "5" / "ar.json"))
    assert cell["train"] == "XVNLI/annotations/ar/train_5.jsonl" and "accuracy" in cell["metrics"]
    # a finished cell is not rerun; a lost result is redone from its saved model
    mtimes = {f: os.path.getmtime(results / f) for f in files}
    os.remove(results / "few_shot" / "5" / "es.json")
    lines = []
    cfg = config_from_argv(FewshotConfig, [str(a) for a in [*xvnli, *common]])
    run_fewshot(cfg, log=lines.append)
    assert f"[fewshot] xvnli: 6 cells, 5 done already, 1 to run; results in {cfg.out}" in lines
    assert not any("[fewshot] fine-tuning" in line for line in lines)
    assert sum("fine-tuned already, reused" in line for line in lines) == 2  # zero-shot, es 5
    assert all(os.path.getmtime(results / f) == t for f, t in mtimes.items()
               if f != "few_shot/5/es.json")
    lines.clear()
    run_fewshot(cfg, log=lines.append)
    assert lines == [f"[fewshot] xvnli: 6 cells, 6 done already, 0 to run; results in {cfg.out}"]
    # retrieval: a 1-shot file has no in-batch negative; that cell is recorded as not run
    _run(fewshot_main, ["--task", "xflickrco", "--images", roots["flickr"].parent,
                        "--languages", "de", "--shots", "1", "5", *common])
    not_run = json.load(open(out / "results" / "xflickrco" / "few_shot" / "1" / "de.json"))
    assert "needs at least 2" in not_run["not_run"]

    _run(table_main, ["--results", out / "results", "--out", tmp_path / "table"])
    # --out names the folder the two files go into (not a prefix of their names)
    assert sorted(os.listdir(tmp_path / "table")) == ["table.json", "table.md"]
    table = json.load(open(tmp_path / "table" / "table.json"))
    md = open(tmp_path / "table" / "table.md").read()
    assert "| zero-shot |" in md and "### xvnli per language" in md
    zs = [json.load(open(results / "zero_shot" / f"{lang}.json"))["metrics"]["accuracy"]
          for lang in ("ar", "es")]
    assert table["table1"]["zero_shot"]["XVNLI"] == {"value": pytest.approx(50 * sum(zs)),
                                                     "partial": True}
    assert table["few_shot_setting"] == {"xvnli": "few_shot/5", "xflickrco": "few_shot/5"}
    assert table["table1"]["few_shot"]["WIT IR"] is None
    assert any("not run" in n for n in table["notes"])


def _feature_store(pre, ds, images, out, tmp_path):
    """A feature store of the image folder ``images`` (the extraction reads a fine-tuning config
    naming it), fp32: fine-tuning from it is bit for bit fine-tuning from the images."""
    ft = finetune_args(["--task", "marvl", "--pair-images", "two_prefixes", "--model", str(pre),
                        "--train", str(ds / PROTOCOLS["marvl"].train), "--images", str(images),
                        "--out", str(tmp_path / "unused")])
    save_config(ft, str(tmp_path / f"{out}.yaml"))
    assert prepare(["image-features", str(tmp_path / f"{out}.yaml"), "--out", str(tmp_path / out),
                    "--dtype", "fp32", "--workers", "0"]) == 0
    return tmp_path / out


def test_fewshot_from_feature_stores_gives_the_results_of_images(release, tmp_path):
    """MaRVL's zero-shot fine-tune reads the store of NLVR2's images, its few-shot continuation
    the store of MaRVL's: the same scores and weights as from the images."""
    root, pre, ds, roots = release
    english = _feature_store(pre, ds, roots["nlvr2"], "nlvr2_store", tmp_path)
    target = _feature_store(pre, ds, roots["marvl"], "marvl_store", tmp_path)
    common = ["--task", "marvl", "--pair-images", "two_prefixes", "--model", pre, "--iglue", ds,
              "--images", roots["nlvr2"], "--target-images", roots["marvl"], "--languages", "id",
              "--shots", "2", "--dev", "false", "--epochs", 1, "--few-shot-epochs", 1,
              "--batch-size", 4, "--workers", 0, "--device", "cpu"]
    lines = []
    stored = run_fewshot(config_from_argv(FewshotConfig, [str(a) for a in [
        *common, "--out", tmp_path / "stored", "--image-features", english,
        "--target-image-features", target]]), log=lines.append)
    assert sum(f"from the feature store {store}" in line
               for line in lines for store in (english, target)) == 2
    pixels = run_fewshot(config_from_argv(FewshotConfig, [str(a) for a in [
        *common, "--out", tmp_path / "pixels"]]), log=lambda _: None)
    assert stored.keys() == pixels.keys() == {"zero_shot id", "few_shot id 2-shot"}
    timing = {"seconds", "records_per_second"}
    for cell in stored:
        scores = [{k: v for k, v in r[cell]["metrics"].items() if k not in timing}
                  for r in (stored, pixels)]
        assert scores[0] == scores[1] and "accuracy" in scores[0], cell
    models = [tmp_path / out / "runs" / "marvl" / "few_shot" / "id" / "2" / "model"
              / "model.safetensors" for out in ("stored", "pixels")]
    a, b = (read_weights(str(m)) for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra, message", [
    (["--image-features", "s"], "fewshot: image_features cannot honour pair_images=side_by_side"),
    (["--pair-images", "two_prefixes", "--target-image-features", "s"],
     "target_image_features is a store of target_images, which is not set")])
def test_fewshot_refuses_a_store_it_cannot_use(extra, message):
    with pytest.raises(ValueError, match=message):
        config_from_argv(FewshotConfig, ["--task", "marvl", "--model", "m", "--iglue", "d",
                                         "--images", "i", *extra])


def test_table_from_a_results_folder_by_hand(tmp_path, capsys):
    res = tmp_path / "results"

    def cell(task, setting, lang, metrics):
        path = res / task / setting / f"{lang}.json"
        os.makedirs(path.parent, exist_ok=True)
        path.write_text(json.dumps({"task": task, "language": lang, "metrics": metrics}))

    for lang, acc in zip(("ar", "es", "fr", "ru"), (0.70, 0.80, 0.75, 0.65)):
        cell("xvnli", "zero_shot", lang, {"accuracy": acc})
        cell("xvnli", "few_shot/48", lang, {"accuracy": acc + 0.01})
        cell("xvnli", "few_shot/1", lang, {"accuracy": 0.5})
    cell("xflickrco", "zero_shot", "de", {"ir_r1": 0.6, "tr_r1": 0.5, "r1": 0.55})
    cell("xflickrco", "zero_shot", "ja", {"ir_r1": 0.4, "tr_r1": 0.3, "r1": 0.35})
    assert table_main(["--results", str(res), "--out", str(tmp_path / "t")]) == 0
    t = json.load(open(tmp_path / "t" / "table.json"))
    row = t["table1"]["zero_shot"]
    assert row["XVNLI"] == {"value": pytest.approx(72.5), "partial": False}
    assert row["xFlickr&CO IR"] == {"value": pytest.approx(50.0), "partial": True}
    assert row["xFlickr&CO TR"]["value"] == pytest.approx(40.0) and row["xGQA"] is None
    assert t["table1"]["few_shot"]["XVNLI"]["value"] == pytest.approx(73.5)  # the 48-shot
    langs = t["per_language"]["xvnli"]["rows"]
    assert list(langs) == ["zero-shot", "few-shot 1", "few-shot 48"]
    assert langs["few-shot 1"]["mean"] == pytest.approx(50.0)
    md = open(tmp_path / "t" / "table.md").read()
    assert "| zero-shot | 72.50 | - | - | 50.00* | 40.00* | - | - |" in md
    assert "xflickrco zero_shot: mean over 2 of 7 languages (de, ja)" in md
    out = capsys.readouterr().out
    assert md in out and f"wrote {tmp_path / 't' / 'table.md'}" in out
    assert table_main(["--results", str(tmp_path / "none")]) == 2
    # --out naming a file: one line saying what it must be
    (tmp_path / "afile").write_text("")
    assert table_main(["--results", str(res), "--out", str(tmp_path / "afile")]) == 2
    assert "is a file; it names the folder" in capsys.readouterr().err
