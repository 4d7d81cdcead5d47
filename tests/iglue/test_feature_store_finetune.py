"""IGLUE fine-tuning from a feature store of the image folder (data.image_features): the
extraction from the fine-tuning config, the losses of fine-tuning from the images step for
step, and what a store cannot serve."""

import json
import random

import pytest
import torch

from unigen.configuration import save_config
from unigen.data.feature_store import FeatureStore
from unigen.data.prepare import main as prepare
from unigen.data.synthetic_text import synthetic_corpus
from unigen.iglue.finetune import finetune, parse_args
from unigen.model.tokenizers import train_tiny_tokenizers
from unigen.model.unigen_model import UniGen

from .conftest import RGB, save_image, write_lines


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pre-trained model, GQA questions and NLVR2 statements over one-colour images
    (NLVR2's in numbered folders), and an image that does not decode."""
    root = tmp_path_factory.mktemp("iglue_store")
    tok = train_tiny_tokenizers(synthetic_corpus(), root / "tok", text_vocab_size=300,
                                decoder_vocab_size=300)
    UniGen.tiny(tok).save_pretrained(root / "pre")
    images, rng, colors = root / "images", random.Random(0), sorted(RGB)
    questions = {}
    for i in range(16):
        color = rng.choice(colors)
        save_image(images, f"gqa/img{i}.jpg", color, size=(40 + i, 30))
        questions[str(100 + i)] = {"imageId": f"img{i}", "question": "what colour is it?",
                                   "answer": color}
    (root / "gqa.json").write_text(json.dumps(questions))
    for i in range(6):
        for side in (0, 1):
            save_image(images, f"nlvr2/{i % 2}/train-{i}-0-img{side}.png", colors[(i + side) % 3])
    write_lines(root / "nlvr2.jsonl", [
        {"sentence": "the left one is red", "identifier": f"train-{i}-0-0",
         "label": "True" if i % 2 == 0 else "False"} for i in range(6)])
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def ft_args(world, task, train, out, store=None, *extra):
    argv = ["--task", task, "--model", str(world / "pre"), "--train", str(world / train),
            "--images", str(world / "images"), "--epochs", "2", "--lr", "1e-3",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--log-every", "1",
            "--out", str(world / out), *extra]
    return parse_args(argv + (["--data.image_features", str(world / store)] if store else []))


def extracted(world, cfg, store, capsys):
    path = str(world / f"{store}.yaml")
    save_config(cfg, path)  # a fine-tuning config names the folder: data.images
    assert prepare(["image-features", path, "--dtype", "fp32", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert f"skipped an image that does not decode: {world / 'images' / 'broken.jpg'}" in out
    return FeatureStore(world / store)


@pytest.mark.parametrize("task, train, extra", [
    ("xgqa", "gqa.json", ()),
    ("marvl", "nlvr2.jsonl", ("--pair-images", "two_prefixes")),  # E_v(left) ⊕ E_v(right)
])
def test_finetuning_from_the_store_gives_the_losses_of_finetuning_from_images(
        world, task, train, extra, capsys):
    store_name = f"store_{task}"
    cfg = ft_args(world, task, train, f"{task}_store", store_name, *extra)
    store = extracted(world, cfg, store_name, capsys)
    assert len(store) == 28 and store.undecodable.keys() == {"broken.jpg"}
    assert "gqa/img3.jpg" in store and "nlvr2/1/train-3-0-img1.png" in store
    lines = []
    from_store = finetune(cfg, log=lines.append)
    from_images = finetune(ft_args(world, task, train, f"{task}_images", None, *extra),
                           log=lambda line: None)
    assert from_store.step == from_images.step > 0
    assert from_store.history["loss"] == from_images.history["loss"]  # bit for bit (fp32)
    a, b = from_store.model.state_dict(), from_images.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_what_a_folder_store_cannot_serve_is_refused(world, capsys):
    side_by_side = ft_args(world, "marvl", "nlvr2.jsonl", "x")
    path = str(world / "side_by_side.yaml")
    save_config(side_by_side, path)
    assert prepare(["image-features", path, "--out", str(world / "x"), "--workers", "0"]) == 2
    assert "pair_images=side_by_side pastes MaRVL's two images" in capsys.readouterr().err
    with pytest.raises(ValueError, match="data.image_features cannot honour "
                                         "pair_images=side_by_side"):
        ft_args(world, "marvl", "nlvr2.jsonl", "x", "any_store")
    # a store of another folder: the training images are not in it
    other = world / "other_images"
    save_image(other, "img0.jpg", "red")
    cfg = ft_args(world, "xgqa", "gqa.json", "y")
    cfg.data.images = str(other)
    save_config(cfg, str(world / "other.yaml"))
    assert prepare(["image-features", str(world / "other.yaml"), "--out", str(world / "other"),
                    "--workers", "0"]) == 0
    with pytest.raises(ValueError, match=r"has no features of 16 of the 16 training images "
                                         r"\(e.g. 'gqa/img0.jpg' below data.images\)"):
        finetune(ft_args(world, "xgqa", "gqa.json", "y", "other"))
    # an image the extraction could not decode stops the run naming it, as from pixels
    (world / "broken.json").write_text(json.dumps(
        {"1": {"imageId": "broken", "question": "what colour?", "answer": "red"}}))
    cfg = ft_args(world, "xgqa", "broken.json", "z", "store_broken")
    extracted(world, cfg, "store_broken", capsys)
    with pytest.raises(ValueError, match=r"image '.*broken.jpg' cannot be decoded \(its feature "
                                         r"extraction found so\)"):
        finetune(cfg)
