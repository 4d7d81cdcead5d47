"""IGLUE fine-tuning (python -m unigen.finetune, a recipe on the training core) and scoring
(python -m unigen.evaluate), on files written here in IGLUE's formats with tiny images and a
tiny model."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from unigen.data.synthetic_text import synthetic_corpus
from unigen.evaluate import main as evaluate_main
from unigen.finetune import main as finetune_main
from unigen.iglue.evaluate import evaluate
from unigen.iglue.finetune import finetune, parse_args
from unigen.model.pretrained import read_weights
from unigen.model.tokenizers import train_tiny_tokenizers
from unigen.model.unigen_model import UniGen
from unigen.training import checkpointing as ckpt

from .conftest import RGB, save_image, write_lines


def ft_config(**flags):
    """A FinetuneConfig from the command line's flags: ft_config(task="xgqa", epochs=2,
    resume=True) is ``--task xgqa --epochs 2 --resume``."""
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)] if value else []
        else:
            argv += [flag, str(value)]
    return parse_args(argv)


def latest_weights(run_dir):
    path = ckpt.latest_checkpoint(ckpt.checkpoint_root(str(run_dir)))
    return read_weights(os.path.join(path, ckpt.MODEL_DIR, "model.safetensors"))


def trainer_state(run_dir):
    path = ckpt.latest_checkpoint(ckpt.checkpoint_root(str(run_dir)))
    return torch.load(os.path.join(path, ckpt.TRAINER_FILE), weights_only=False)


def metrics_lines(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


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
    # NLVR2 (MaRVL's English training set): images in numbered folders, named by the pair
    for i in range(6):
        for side in (0, 1):
            save_image(images, f"nlvr2/train/{i % 2}/train-{i}-0-img{side}.png", colors[(i + side) % 3])
    files["marvl"] = write_lines(root / "marvl.jsonl", [
        {"sentence": "the left one is red", "identifier": f"train-{i}-0-0",
         "label": "True" if i % 2 == 0 else "False"} for i in range(6)])
    files["xflickrco"] = write_lines(root / "flickr.jsonl", [
        {"img_path": f"train{i}.jpg", "sentences": ["a red thing", "it is red"] if i % 2 else ["a blue thing"]}
        for i in range(8)])
    return root, images, files


def test_finetune_learns_a_task_and_evaluate_scores_it(world):
    root, images, files = world
    before = evaluate("xgqa", str(root / "pre"), [f"fr={files['test_fr']}"], str(images),
                      workers=0, device="cpu", log=lambda _: None)
    lines = []
    result = finetune(ft_config(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                                images=str(images), out=str(root / "run"), dev=[str(files["dev"])],
                                epochs=20, lr=1e-3, batch_size=16, workers=0, device="cpu", log_every=6),
                      log=lines.append)
    assert any("fine-tuning xgqa on 96 examples" in line for line in lines)
    losses = result.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert len(result.dev) == 20 and result.best_epoch is not None
    best = max(result.dev, key=lambda d: d["score"])
    assert best["epoch"] == result.best_epoch
    logged = metrics_lines(root / "run")
    assert sum("dev" in e for e in logged) == 20 and logged[0]["step"] == 6
    assert yaml.safe_load(open(root / "run" / "config.yaml"))["task"] == "xgqa"

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
    assert len(preds) == 30 and set(preds[0]) == {"uid", "prediction", "answer", "correct",
                                                   "relaxed_correct"}
    # the fine-tuned model is there to stay: a second run into the same directory is refused
    with pytest.raises(FileExistsError, match="already holds a fine-tuned model"):
        finetune(ft_config(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                           images=str(images), out=str(root / "run"), workers=0, device="cpu"))


@pytest.mark.parametrize("task", ["xvnli", "marvl", "xflickrco"])
def test_finetune_and_score_every_task(world, task):
    root, images, files = world
    out = root / f"run_{task}"
    precision = "bf16" if task == "xvnli" else "fp32"  # bf16 autocast runs on CPU too
    result = finetune(ft_config(task=task, model=str(root / "pre"), train=[str(files[task])],
                                images=str(images), out=str(out), epochs=1, batch_size=4,
                                workers=0, device="cpu", precision=precision), log=lambda _: None)
    assert result.history["loss"] and torch.isfinite(torch.tensor(result.history["loss"])).all()
    assert os.path.isfile(out / "model" / "config.json")
    scores = evaluate(task, str(out / "model"), [str(files[task])], str(images), workers=0, device="cpu", k=3,
                      precision=precision, predictions_dir=str(out / "preds"), log=lambda _: None)
    metrics = scores[str(files[task])]
    if task == "xflickrco":
        assert metrics["images"] == 8 and metrics["texts"] == 12
        assert 0.0 <= metrics["r1"] <= 1.0 and metrics["tr_chance"] == pytest.approx(
            sum(len(s) for s in [["a"], ["a", "b"]] * 4) / 8 / 12)
        # retrieval writes its rankings: every caption's images, then every image's captions,
        # whose hits are the R@1 the metrics report
        (written,) = os.listdir(out / "preds")
        rows = [json.loads(line) for line in open(out / "preds" / written)]
        by_text = [r for r in rows if r["query"] == "text"]
        by_image = [r for r in rows if r["query"] == "image"]
        assert len(by_text) == 12 and len(by_image) == 8 and len(rows) == 20
        assert all(len(r["ranked"]) == 3 for r in rows)  # the re-ranked top k = 3
        assert sum(r["correct"] for r in by_text) / 12 == pytest.approx(metrics["ir_r1"])
        assert sum(r["correct"] for r in by_image) / 8 == pytest.approx(metrics["tr_r1"])
        assert all(r["correct"] == (r["ranked"][0] == r["image"]) for r in by_text)
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
    for key, value, message in [("epochs", 0, "exactly one of schedule.steps"),
                                ("lr", 0.0, "optim.lr must be a finite number > 0"),
                                ("task", "vqa", "task must be one of"),
                                ("precision", "fp8", "'run.precision': expected one of"),
                                ("decay", "step", "'schedule.decay': expected one of"),
                                ("min_lr_ratio", 2.0, "schedule.min_lr_ratio must be a finite "
                                                      "number >= 0.0 and <= 1.0")]:
        with pytest.raises(ValueError, match=message):
            finetune(ft_config(**{**base, key: value}), log=lambda _: None)
    assert finetune_main(["--task", "xgqa", "--model", str(root / "pre"), "--train",
                          str(root / "missing.json"), "--images", str(images),
                          "--out", str(root / "bad")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert finetune_main(["--task", "xgqa", "--model", str(root / "pre"), "--images", str(images)]) == 2
    assert "missing required key(s) 'data.train'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="NAME=FILE"):
        evaluate("xgqa", str(root / "pre"), ["fr="], str(images))
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        evaluate("xgqa", str(root / "pre"), [str(files["dev"])], str(images), batch_size=0)
    with pytest.raises(ValueError, match="precision must be"):
        evaluate("xgqa", str(root / "pre"), [str(files["dev"])], str(images), precision="fp16")
    with pytest.raises(ValueError, match="decode='rank' needs a closed set of answers"):
        evaluate("xgqa", str(root / "pre"), [str(files["dev"])], str(images), decode="rank")
    with pytest.raises(ValueError, match="decode='rank' needs a closed set of answers"):
        finetune(ft_config(**{**base, "decode": "rank"}), log=lambda _: None)
    with pytest.raises(ValueError, match="test names must differ"):
        evaluate("xgqa", str(root / "pre"), [f"a={files['dev']}", f"a={files['train']}"], str(images))


def test_a_diverging_run_stops_with_a_clear_error(world):
    root, images, files = world
    with pytest.raises(FloatingPointError, match=r"the loss is (nan|inf) at step 2; try a lower --optim.lr"):
        finetune(ft_config(task="xgqa", model=str(root / "pre"), train=[str(files["dev"])],
                           images=str(images), out=str(root / "nan"), lr=1e30,
                           epochs=2, batch_size=6, workers=0, device="cpu", log_every=1),
                 log=lambda _: None)


@pytest.mark.parametrize("task,batch_size,save_every,stop,resumed_at", [
    ("xgqa", 16, 4, 9, "at step 8 (epoch 2, 2 of 6 steps done)"),
    # retrieval: the mined negatives come from a generator that must be restored too
    ("xflickrco", 4, 2, 5, "at step 4 (epoch 2, 1 of 3 steps done)")])
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
    whole = finetune(ft_config(**base, out=str(root / f"whole_{task}")), log=lambda _: None)

    def stop_there(line):
        if line.startswith(f"step {stop} (epoch 2)"):
            raise KeyboardInterrupt

    out = str(root / f"stopped_{task}")
    with pytest.raises(KeyboardInterrupt):
        finetune(ft_config(**base, out=out), log=stop_there)
    lines = []
    resumed = finetune(ft_config(**base, out=out, resume=True), log=lines.append)
    assert any("resumed from" in line and resumed_at in line for line in lines)
    assert list(zip(resumed.history["step"], resumed.history["loss"])) == \
        list(zip(whole.history["step"], whole.history["loss"]))
    assert [d["files"] for d in resumed.dev] == [d["files"] for d in whole.dev]
    # the log keeps what came before the checkpoint and then the redone steps, once each
    logged = metrics_lines(out)
    assert [e["step"] for e in logged if "dev" not in e] == whole.history["step"]
    assert [e["dev"]["epoch"] for e in logged if "dev" in e] == [1, 2]
    a, b = latest_weights(root / f"whole_{task}"), latest_weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    with pytest.raises(ValueError, match=r"data.batch_size \d+ → 2 cannot change when resuming"):
        finetune(ft_config(**{**base, "batch_size": 2}, out=out, resume=True),
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
    ddp, single = metrics_lines(root / "ddp"), metrics_lines(root / "single")
    assert [e["step"] for e in ddp] == [e["step"] for e in single] == list(range(1, 13))
    for a, b in zip(ddp, single):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-5)
    state = trainer_state(root / "ddp")
    assert state["world_size"] == 2 and len(state["ranks"]) == 2  # each rank's random states
    a, b = latest_weights(root / "ddp"), latest_weights(root / "single")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_stop_at_step_then_resume(world):
    """--stop-at-step checkpoints and stops (no model yet); --resume ends where the run
    without the stop ends."""
    root, images, files = world
    base = dict(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                images=str(images), epochs=2, lr=1e-3, batch_size=16, workers=0, device="cpu",
                log_every=1)
    whole = finetune(ft_config(**base, out=str(root / "whole_stop")), log=lambda _: None)
    out = str(root / "stop")
    lines = []
    finetune(ft_config(**base, out=out, stop_at_step=9), log=lines.append)
    assert ("[unigen.finetune] stopped at step 9 (run.stop_at_step); --resume "
            "(checkpoint.resume=auto) continues") in lines
    # the summary says why there is no model yet
    assert any(line.startswith("[unigen.finetune] final model: not written, the run is not "
                               "complete (--resume") for line in lines)
    assert not os.path.exists(os.path.join(out, "model"))
    resumed = finetune(ft_config(**base, out=out, resume=True), log=lambda _: None)
    assert list(zip(resumed.history["step"], resumed.history["loss"])) == \
        list(zip(whole.history["step"], whole.history["loss"]))
    a, b = latest_weights(root / "whole_stop"), latest_weights(out)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert os.path.isfile(os.path.join(out, "model", "config.json"))


def test_schedule_warmup_then_linear_decay(world):
    root, images, files = world
    result = finetune(ft_config(task="xgqa", model=str(root / "pre"),
                                train=[str(files["train"])], images=str(images),
                                out=str(root / "sched"), epochs=1, batch_size=16, lr=1e-3,
                                warmup_steps=2, decay="linear", workers=0, device="cpu",
                                log_every=1), log=lambda _: None)
    # 6 steps: warm-up 1/2, 1, then linear to 0 at the last step
    expected = [1e-3 * f for f in (0.5, 1.0, 0.75, 0.5, 0.25, 0.0)]
    assert result.history["lr"] == pytest.approx(expected)


def test_finetune_and_evaluate_read_a_config_file(world, tmp_path, capsys):
    """Both entry points take --config FILE.yaml plus --section.key=value overrides (the
    loader of pre-training), and write the resolved config with their results."""
    root, images, files = world
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump({
        "task": "xvnli", "model": str(root / "pre"),
        "data": {"train": [str(files["xvnli"])], "images": str(images), "batch_size": 4,
                 "workers": 0},
        "schedule": {"epochs": 1}, "run": {"output_dir": str(tmp_path / "run"), "device": "cpu"},
        "logging": {"progress_bar": False}}))
    assert finetune_main(["--config", str(path), "--optim.lr=1e-3"]) == 0
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    # the override, and the recipe's own defaults for the rest of the section
    assert saved["optim"]["lr"] == 1e-3 and saved["optim"]["weight_decay"] == 0.01
    assert saved["schedule"]["decay"] == "constant"
    path = tmp_path / "evaluate.yaml"
    path.write_text(yaml.safe_dump({
        "task": "xvnli", "model": str(tmp_path / "run" / "model"),
        "tests": [f"en={files['xvnli']}"], "images": str(images), "device": "cpu",
        "out": str(tmp_path / "scores.json"), "scoring": {"workers": 0, "decode": "rank"}}))
    assert evaluate_main(["--config", str(path)]) == 0
    scores = json.load(open(tmp_path / "scores.json"))
    assert scores["config"]["scoring"]["decode"] == "rank"
    assert scores["results"]["en"]["not_a_label"] == 0.0
    capsys.readouterr()
    assert finetune_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--optim.lr  float = 3e-05" in text and "--lr" in text and "--resume" in text


@pytest.mark.parametrize("task,used", [("xflickrco", True), ("wit", True), ("xgqa", False),
                                       ("xvnli", False), ("marvl", False)])
def test_ddp_searches_for_unused_parameters_only_for_qus_tasks(task, used):
    # retrieval's L_CL and [match] reach every trainable part on every batch; [qus] leaves the
    # contrastive projections and the temperature without a gradient
    from types import SimpleNamespace

    from unigen.iglue.finetune import FinetuneRecipe

    assert FinetuneRecipe.every_parameter_used(SimpleNamespace(cfg=SimpleNamespace(task=task))) \
        is used


def test_more_epochs_extend_a_finished_run_only_when_accepted(world):
    root, images, files = world
    base = dict(task="xgqa", model=str(root / "pre"), train=[str(files["train"])],
                images=str(images), lr=1e-3, batch_size=16, workers=0, device="cpu",
                out=str(root / "extend"))
    first = finetune(ft_config(**base, epochs=1), log=lambda _: None)
    with pytest.raises(ValueError, match=r"schedule.epochs 1 → 2; .*--checkpoint.accept_changes="
                                         r"schedule.epochs"):
        finetune(ft_config(**base, epochs=2, resume=True), log=lambda _: None)
    lines = []
    longer = finetune(ft_config(**base, epochs=2, resume=True, accept_changes="schedule.epochs"),
                      log=lines.append)
    assert longer.step == 2 * first.step
    assert "[unigen.finetune] resuming with schedule.epochs 1 → 2 (checkpoint.accept_changes)" \
        in lines
