"""IGLUE: the task files' readers, image resolution, fine-tuning (python -m unigen.finetune) and
scoring (python -m unigen.evaluate), on files written here in IGLUE's formats with tiny images
and a tiny model."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from PIL import Image

from unigen.data.errors import DataFormatError
from unigen.iglue.images import ImageResolver
from unigen.iglue.readers import read_iglue
from unigen.scoring import recall_at_1
from unigen.evaluate import evaluate, main as evaluate_main
from unigen.finetune import FinetuneConfig, finetune, main as finetune_main
from unigen.model.unigen_model import RetrievalResult, UniGen
from unigen.data.synthetic_text import synthetic_corpus
from unigen.model.tokenizers import train_tiny_tokenizers

RGB = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread):
    """Tiny-model tests run on one intra-op thread (tests/conftest.py says why)."""


def write_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def save_image(root, name, color, size=(40, 30)):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, RGB[color]).save(path)


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
        {"caption": "Terdapat tutup panci", "left_img": "39-Panci/39-n-5.jpg",
         "right_img": "39-Panci/39-n-2.jpg", "id": "id-0", "label": True, "language": "id"},
        {"identifier": "dev-850-0-1", "sentence": "Gambar kanan", "label": "False"}])
    a, b = read_iglue("marvl", p).records
    assert (a.uid, a.images, a.answer) == ("id-0", ("39-Panci/39-n-5.jpg", "39-Panci/39-n-2.jpg"), "yes")
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
    ("marvl", [{"caption": "c", "left_img": "l", "right_img": "r", "label": "maybe"}],
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

    def rank(s, m):
        top_sim, top = s.topk(s.shape[1], dim=1)
        order = m.gather(1, top).argsort(dim=1, descending=True)
        return top.gather(1, order), m.gather(1, top).gather(1, order), top_sim.gather(1, order)

    result = RetrievalResult(*rank(sim, match), *rank(sim.t(), match.t()))
    correct = torch.tensor([[True, True, False], [False, False, True]])
    s = recall_at_1(result, correct)
    assert s.i2t_contrastive == 0.5  # image 1's most similar caption (1) is image 0's
    assert s.i2t_rerank == 0.5  # [match] sends image 0 to caption 2
    assert s.t2i_contrastive == pytest.approx(2 / 3)  # caption 1 → image 1: wrong
    assert s.t2i_rerank == pytest.approx(2 / 3)  # caption 1 fixed, caption 2 → image 0 now
    assert s.i2t_chance == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert s.t2i_chance == pytest.approx(0.5)


# ---- fine-tuning and scoring --------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pre-trained model directory and IGLUE-format files over one-colour images."""
    root = tmp_path_factory.mktemp("iglue")
    tok = train_tiny_tokenizers(synthetic_corpus(), root / "tok", text_vocab_size=300,
                                decoder_vocab_size=300)
    UniGen.tiny(tok).save_pretrained(root / "pre")
    images = root / "images"
    rng = random.Random(0)
    files = {}

    def gqa(name, n, question):
        data = {}
        for i in range(n):
            color = rng.choice(sorted(RGB))
            save_image(images, f"{name}{i}.jpg", color)
            data[str(1000 + i)] = {"imageId": f"{name}{i}", "question": question, "answer": color}
        files[name] = root / f"{name}.json"
        files[name].write_text(json.dumps(data))

    gqa("train", 96, "what is the color of the thing?")
    gqa("dev", 12, "quelle couleur?")
    gqa("test_fr", 30, "quelle couleur?")
    colors = sorted(RGB)
    files["xvnli"] = write_lines(root / "xvnli.jsonl", [
        {"gold_label": label, "sentence2": f"a {c} thing", "pairID": f"{i}", "Flikr30kID": f"train{i}"}
        for i in range(8) for c, label in [(colors[i % 3], "entailment")]])
    files["marvl"] = write_lines(root / "marvl.jsonl", [
        {"caption": "the left one is red", "left_img": f"train{i}.jpg", "right_img": f"train{i + 1}.jpg",
         "id": f"m{i}", "label": i % 2 == 0} for i in range(6)])
    files["xflickrco"] = write_lines(root / "flickr.jsonl", [
        {"img_path": f"train{i}.jpg", "sentences": ["a red thing", "it is red"] if i % 2 else ["a blue thing"]}
        for i in range(8)])
    return root, images, files


def test_finetune_learns_a_task_and_evaluate_scores_it(world):
    root, images, files = world
    before = evaluate("xgqa", str(root / "pre"), [f"fr={files['test_fr']}"], str(images),
                      workers=0, device="cpu", log=lambda _: None)
    lines = []
    result = finetune(FinetuneConfig(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                                     images=str(images), out=str(root / "run"), dev=[str(files["dev"])],
                                     epochs=20, lr=1e-3, batch_size=16, workers=0, device="cpu", log_every=6),
                      log=lines.append)
    assert any("fine-tuning xgqa on 96 examples" in line for line in lines)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert len(result.dev) == 20 and result.best_epoch is not None
    best = max(result.dev, key=lambda d: d["score"])
    assert best["epoch"] == result.best_epoch
    logged = [json.loads(line) for line in open(root / "run" / "log.jsonl")]
    assert sum("dev" in e for e in logged) == 20 and logged[0]["step"] == 6
    assert json.load(open(root / "run" / "finetune_config.json"))["task"] == "xgqa"

    out = root / "scores.json"
    assert evaluate_main(["--task", "xgqa", "--model", str(root / "run" / "model"),
                          "--test", f"fr={files['test_fr']}", "--images", str(images),
                          "--workers", "0", "--device", "cpu", "--out", str(out),
                          "--predictions", str(root / "preds")]) == 0
    after = json.load(open(out))["results"]
    # The questions of the test file are French, those of training English (zero-shot transfer).
    assert before["fr"]["accuracy"] < 0.5
    assert after["fr"]["accuracy"] >= 0.9 and after["mean"] == after["fr"]["accuracy"]
    preds = [json.loads(line) for line in open(root / "preds" / "fr.jsonl")]
    assert len(preds) == 30 and set(preds[0]) == {"uid", "prediction", "answer", "correct"}
    # the fine-tuned model is there to stay: a second run into the same directory is refused
    with pytest.raises(FileExistsError, match="already holds a fine-tuned model"):
        finetune(FinetuneConfig(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                                images=str(images), out=str(root / "run"), workers=0, device="cpu"))


@pytest.mark.parametrize("task", ["xvnli", "marvl", "xflickrco"])
def test_finetune_and_score_every_task(world, task):
    root, images, files = world
    out = root / f"run_{task}"
    precision = "bf16" if task == "xvnli" else "fp32"  # bf16 autocast runs on CPU too
    result = finetune(FinetuneConfig(task=task, model=str(root / "pre"), train=[str(files[task])],
                                     images=str(images), out=str(out), epochs=1, batch_size=4,
                                     workers=0, device="cpu", precision=precision), log=lambda _: None)
    assert result.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert os.path.isfile(out / "model" / "config.json")
    scores = evaluate(task, str(out / "model"), [str(files[task])], str(images), workers=0, device="cpu", k=3,
                      precision=precision, predictions_dir=str(out / "preds"), log=lambda _: None)
    metrics = scores[str(files[task])]
    if task == "xflickrco":
        assert metrics["images"] == 8 and metrics["texts"] == 12
        assert 0.0 <= metrics["r1"] <= 1.0 and metrics["i2t_chance"] == pytest.approx(
            sum(len(s) for s in [["a"], ["a", "b"]] * 4) / 8 / 12)
        assert not os.path.exists(out / "preds") or not os.listdir(out / "preds")
    else:
        assert 0.0 <= metrics["accuracy"] <= 1.0 and "not_a_label" in metrics
        # a bare path names the predictions file, its folders joined by "_"
        (written,) = os.listdir(out / "preds")
        assert written == str(files[task]).strip("/").replace("/", "_") + ".jsonl"
        # ranking the keywords never answers off-label
        ranked = evaluate(task, str(out / "model"), [f"r={files[task]}"], str(images), workers=0,
                          device="cpu", decode="rank", predictions_dir=str(out / "ranked"),
                          log=lambda _: None)["r"]
        assert ranked["not_a_label"] == 0.0
        words = {"yes", "no", "maybe"} if task == "xvnli" else {"yes", "no"}
        assert {json.loads(line)["prediction"] for line in open(out / "ranked" / "r.jsonl")} <= words


def test_bad_arguments_are_named(world, capsys):
    root, images, files = world
    base = dict(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                images=str(images), out=str(root / "bad"), workers=0, device="cpu")
    for key, value, message in [("epochs", 0, "epochs must be a positive int"),
                                ("lr", 0.0, "lr must be a finite number > 0"),
                                ("task", "vqa", "task must be one of"),
                                ("precision", "fp8", "precision must be"),
                                ("decay", "step", "decay must be constant, linear or cosine"),
                                ("min_lr_ratio", 2.0, "min_lr_ratio must be in")]:
        with pytest.raises(ValueError, match=message):
            finetune(FinetuneConfig(**{**base, key: value}), log=lambda _: None)
    assert finetune_main(["--task", "xgqa", "--model", str(root / "pre"), "--train",
                          str(root / "missing.json"), "--images", str(images),
                          "--out", str(root / "bad")]) == 2
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME=FILE"):
        evaluate("xgqa", str(root / "pre"), ["fr="], str(images))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluate("xgqa", str(root / "pre"), [str(files["dev"])], str(images), batch_size=0)
    with pytest.raises(ValueError, match="precision must be"):
        evaluate("xgqa", str(root / "pre"), [str(files["dev"])], str(images), precision="fp16")
    with pytest.raises(ValueError, match="decode='rank' needs a closed set of answers"):
        evaluate("xgqa", str(root / "pre"), [str(files["dev"])], str(images), decode="rank")
    with pytest.raises(ValueError, match="decode='rank' needs a closed set of answers"):
        finetune(FinetuneConfig(**{**base, "decode": "rank"}), log=lambda _: None)
    with pytest.raises(ValueError, match="test names must differ"):
        evaluate("xgqa", str(root / "pre"), [f"a={files['dev']}", f"a={files['train']}"], str(images))


def test_a_diverging_run_stops_with_a_clear_error(world):
    root, images, files = world
    with pytest.raises(FloatingPointError, match=r"the loss is (nan|inf) at step 2; try a lower --lr"):
        finetune(FinetuneConfig(task="xgqa", model=str(root / "pre"), train=[str(files["dev"])],
                                images=str(images), out=str(root / "nan"), lr=1e30,
                                epochs=2, batch_size=6, workers=0, device="cpu", log_every=1),
                 log=lambda _: None)


@pytest.mark.parametrize("task,batch_size,save_every,stop,resumed_at", [
    ("xgqa", 16, 4, 9, "epoch 2, 2 of 6 batches done, step 8"),
    # retrieval: the mined negatives come from a generator that must be restored too
    ("xflickrco", 4, 2, 5, "epoch 2, 1 of 3 batches done, step 4")])
def test_an_interrupted_run_resumes_on_the_same_batches(world, task, batch_size, save_every,
                                                         stop, resumed_at):
    """A run stopped mid-epoch and resumed from its last checkpoint ends exactly where the
    uninterrupted run ends: same losses step by step, same dev scores, same weights."""
    root, images, files = world
    train = str(files["train"] if task == "xgqa" else files[task])
    dev = str(files["dev"] if task == "xgqa" else files[task])
    base = dict(task=task, model=str(root / "pre"), train=[train], dev=[dev], images=str(images),
                epochs=2, lr=1e-3, batch_size=batch_size, workers=0, device="cpu", log_every=1,
                save_every=save_every, k=3)
    whole = finetune(FinetuneConfig(**base, out=str(root / f"whole_{task}")), log=lambda _: None)

    def stop_there(line):
        if line.startswith(f"epoch 2 step {stop}:"):
            raise KeyboardInterrupt

    out = str(root / f"stopped_{task}")
    with pytest.raises(KeyboardInterrupt):
        finetune(FinetuneConfig(**base, out=out), log=stop_there)
    lines = []
    resumed = finetune(FinetuneConfig(**base, out=out, resume=True), log=lines.append)
    assert any("resumed from" in line and resumed_at in line for line in lines)
    assert [(h["step"], h["loss"]) for h in resumed.history] == \
        [(h["step"], h["loss"]) for h in whole.history]
    assert [d["files"] for d in resumed.dev] == [d["files"] for d in whole.dev]
    # the log keeps what came before the checkpoint and then the redone steps, once each
    logged = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [e.get("step") for e in logged if "step" in e] == [h["step"] for h in whole.history]
    assert [e["dev"]["epoch"] for e in logged if "dev" in e] == [1, 2]
    a = torch.load(os.path.join(root, f"whole_{task}", "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    with pytest.raises(ValueError, match="--resume with other batch_size"):
        finetune(FinetuneConfig(**{**base, "batch_size": 2}, out=out, resume=True),
                 log=lambda _: None)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_processes_take_the_steps_of_one_with_the_global_batch(world):
    """torchrun, 2 processes (gloo) × 8 examples = one process × 16: the same global batches,
    so (every target being as long) the same losses step by step and the same weights."""
    root, images, files = world
    rows = json.loads(open(files["train"]).read())
    for q in rows.values():
        q["answer"] = "red"  # equal target lengths: the mean of the two halves' means is the mean
    train = root / "train_red.json"
    train.write_text(json.dumps(rows))
    common = ["--task", "xgqa", "--model", str(root / "pre"), "--train", str(train),
              "--images", str(images), "--epochs", "2", "--lr", "1e-3", "--workers", "0",
              "--device", "cpu", "--log-every", "1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unigen.finetune", *common, "--batch-size", "8", "--out", str(root / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "batch 8 per process × 2 processes" in proc.stdout
    assert finetune_main([*common, "--batch-size", "16", "--out", str(root / "single")]) == 0
    ddp = [json.loads(line) for line in open(root / "ddp" / "log.jsonl")]
    single = [json.loads(line) for line in open(root / "single" / "log.jsonl")]
    assert [e["step"] for e in ddp] == [e["step"] for e in single] == list(range(1, 13))
    for a, b in zip(ddp, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a = torch.load(root / "ddp" / "checkpoint.pt", weights_only=False)
    b = torch.load(root / "single" / "checkpoint.pt", weights_only=False)
    assert a["world"] == 2 and len(a["mining"]) == 2
    for name in b["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-3, atol=1e-4)


def test_stop_at_step_then_resume(world):
    """--stop-at-step checkpoints and stops (no model yet); --resume ends where the run
    without the stop ends."""
    root, images, files = world
    base = dict(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                images=str(images), epochs=2, lr=1e-3, batch_size=16, workers=0, device="cpu",
                log_every=1)
    whole = finetune(FinetuneConfig(**base, out=str(root / "whole_stop")), log=lambda _: None)
    out = str(root / "stop")
    lines = []
    finetune(FinetuneConfig(**base, out=out, stop_at_step=9), log=lines.append)
    assert lines[-1] == "stopped after step 9 (--stop-at-step); --resume continues"
    assert not os.path.exists(os.path.join(out, "model"))
    resumed = finetune(FinetuneConfig(**base, out=out, resume=True), log=lambda _: None)
    assert [(h["step"], h["loss"]) for h in resumed.history] == \
        [(h["step"], h["loss"]) for h in whole.history]
    a = torch.load(os.path.join(root, "whole_stop", "checkpoint.pt"), weights_only=False)
    b = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert all(torch.equal(a["model"][n], b["model"][n]) for n in a["model"])
    assert os.path.isfile(os.path.join(out, "model", "config.json"))


def test_schedule_warmup_then_linear_decay(world):
    root, images, files = world
    result = finetune(FinetuneConfig(task="xgqa", model=str(root / "pre"),
                                     train=[str(files["train"])], images=str(images),
                                     out=str(root / "sched"), epochs=1, batch_size=16, lr=1e-3,
                                     warmup_steps=2, decay="linear", workers=0, device="cpu",
                                     log_every=1), log=lambda _: None)
    # 6 steps: warm-up 1/2, 1, then linear to 0 at the last step
    expected = [1e-3 * f for f in (0.5, 1.0, 0.75, 0.5, 0.25, 0.0)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)
