"""Pre-training from a feature store (data.image_features): the losses of the run from the
images step for step, exact resuming, and one-line refusals of what a store cannot honour."""

import os

import pytest
import torch

from unigen.configuration import save_config
from unigen.data.prepare import main as prepare
from unigen.model.unigen_model import UniGen
from unigen.pretraining import HISTORY_KEYS
from unigen.train import main as train_main
from unigen.train import train

from .conftest import build_config


@pytest.fixture(scope="module")
def stores(train_world, tmp_path_factory):
    """A tiny model whose ViT runs in bf16, as the paper's (so its output already is bf16
    values and a bf16 store holds them exactly), and a bf16 and an fp8 store of its ViT over
    the world's image shards, made through the command line."""
    root = tmp_path_factory.mktemp("feature_store_training")
    cfg = build_config(train_world, str(root / "unused"))
    cfg.model.vision.compute_dtype = "bfloat16"
    torch.manual_seed(5)
    UniGen(cfg.model).save_pretrained(root / "pre")
    cfg.init.from_pretrained = str(root / "pre")
    path = str(root / "extract.yaml")
    save_config(cfg, path)
    for dtype in ("bf16", "fp8"):
        assert prepare(["image-features", path, "--out", str(root / dtype), "--dtype", dtype,
                        "--workers", "0"]) == 0
    return root


def config(train_world, stores, name, store=None, **sections):
    cfg = build_config(train_world, str(stores / "runs" / name), **sections)
    cfg.init.from_pretrained = str(stores / "pre")
    cfg.data.image_features = str(stores / store) if store else ""
    return cfg


@pytest.fixture(scope="module")
def from_images(train_world, stores):
    return train(config(train_world, stores, "images", checkpoint={"every": 0}))


def test_training_from_a_bf16_store_gives_the_losses_of_training_from_images(
        train_world, stores, from_images):
    stored = train(config(train_world, stores, "bf16", "bf16", checkpoint={"every": 0}))
    assert stored.step == from_images.step == 6
    for key in HISTORY_KEYS:
        assert stored.history[key] == from_images.history[key], key  # bit for bit
    # the final models too: nothing after the ViT was told apart
    a, b = stored.model.state_dict(), from_images.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_fp8_store_stays_within_its_quantisation_error(train_world, stores, from_images):
    stored = train(config(train_world, stores, "fp8", "fp8", checkpoint={"every": 0}))
    # e4m3 rounds each feature by up to 2^-4 of itself; after ln_vision and the Q-Former the
    # per-step losses of the tiny model move by far less (measured: at most 1.2e-4)
    for key in ("loss", "cap", "qus", "match", "cl"):
        assert stored.history[key] == pytest.approx(from_images.history[key], rel=1e-3), key
    assert stored.history["loss"] != from_images.history["loss"]
    # step 1's translation loss reads no image: the same weights give the same value
    assert stored.history["trans"][0] == from_images.history["trans"][0]


def test_a_run_from_a_store_resumes_exactly_through_a_loader_worker(train_world, stores,
                                                                   from_images):
    cfg = config(train_world, stores, "resumed", "bf16", data={"num_workers": 1},
                 run={"stop_at_step": 3})
    first = train(cfg)
    assert first.step == 3
    cfg.run.stop_at_step = 0
    resumed = train(cfg)
    assert resumed.resumed_from is not None and resumed.step == 6
    for key in HISTORY_KEYS:
        assert resumed.history[key] == from_images.history[key], key


def test_what_a_store_cannot_honour_ends_in_one_line(train_world, stores, capsys):
    def refused(name, *overrides, init=True):
        cfg = config(train_world, stores, name, "bf16")
        if not init:
            cfg.init.from_pretrained = ""
        path = str(stores / f"{name}.yaml")
        save_config(cfg, path)
        assert train_main(["--config", path, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("unigen.train: error: ")
        assert not os.path.exists(cfg.run.output_dir)  # refused before a run folder is made
        return err

    assert "run.precision gives bf16 autocast but the feature store" in refused(
        "autocast", "--run.precision=bf16")
    assert "data.random_resized_crop = (0.5, 1.0) but the feature store" in refused(
        "crop", "--data.random_resized_crop=[0.5, 1.0]")
    assert "model.vision.frozen is false" in refused(
        "trained_vit", "--model.vision.frozen=false", init=False)
    assert "model.vision.compute_dtype = 'float32' but the feature store" in refused(
        "fp32_vit", init=False)
    assert "the model's ViT weights (sha256" in refused(
        "other_weights", "--model.vision.compute_dtype=bfloat16", init=False)
