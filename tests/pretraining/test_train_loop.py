"""The training loop in-process on CPU: a few steps, checkpoints, resume, optimizer set-up."""

import json
import math
import os

import pytest
import torch

from unigen.configuration import load_config
from unigen.model.unigen_model import UniGen
from unigen.pretraining import HISTORY_KEYS, PretrainConfig
from unigen.train import train
from unigen.training import TrainResult, trainable_param_groups
from unigen.training import checkpointing as ckpt


def test_few_steps_write_checkpoints_config_and_metrics(make_config):
    cfg = make_config(logging={"tensorboard": True})
    result = train(cfg)
    assert isinstance(result, TrainResult) and result.step == 6
    h = result.history
    assert h["step"] == [1, 2, 3, 4, 5, 6]
    assert set(HISTORY_KEYS) <= set(h)
    assert all(math.isfinite(x) for x in h["loss"] + h["cl"])
    # interleaved mixing: every batch holds every task, so every task has a loss each step
    for t in ("trans", "cap", "qus", "match"):
        assert all(v is not None and math.isfinite(v) and v > 0 for v in h[t])
    assert h["loss"][-1] < h["loss"][0]  # lr 1e-3 on a tiny model: it learns in 6 steps
    assert h["lr"] == pytest.approx([5e-4, 1e-3, 0.75e-3, 0.5e-3, 0.25e-3, 0.0])

    # keep_last=2 with a save every 2 steps: only steps 4 and 6 remain, no temporaries
    root = ckpt.checkpoint_root(cfg.run.output_dir)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [4, 6]
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]
    assert result.last_checkpoint == os.path.join(root, "step_00000006")

    # the resolved config is saved and reloads to the same dataclass
    saved = load_config(PretrainConfig, os.path.join(cfg.run.output_dir, "config.yaml"))
    assert saved == cfg

    # metrics.jsonl: one line per log interval, with the documented keys
    with open(os.path.join(cfg.run.output_dir, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [x["step"] for x in lines] == [2, 4, 6]
    for key in ("loss/total", "loss/trans", "loss/cap", "loss/qus", "loss/match", "loss/cl",
                "temperature", "lr", "samples_per_s", "tokens_per_s", "mfu", "peak_mem_gib"):
        assert key in lines[-1], key
    assert lines[-1]["mfu"] is None  # no peak FLOP/s on a CPU
    assert lines[-1]["samples_per_s"] > 0
    assert os.listdir(os.path.join(cfg.run.output_dir, "tensorboard"))

    # the final model and every checkpoint's model load with UniGen.from_pretrained
    final = UniGen.from_pretrained(result.final_model_dir)
    for k, v in result.model.state_dict().items():
        torch.testing.assert_close(final.state_dict()[k], v, rtol=0, atol=0)
    step4 = UniGen.from_pretrained(os.path.join(root, "step_00000004", "model"))
    frozen = {n for n, p in result.model.named_parameters() if not p.requires_grad}
    assert frozen  # the ViT and the middle decoder blocks
    changed = {n for n, p in result.model.named_parameters()
               if not torch.equal(p.detach(), step4.state_dict()[n])}
    assert changed and not (changed & frozen)  # frozen weights never move


def test_frozen_parameters_stay_out_of_the_optimizer_and_1d_are_not_decayed(make_config):
    cfg = make_config()
    model = UniGen(cfg.model)
    groups = trainable_param_groups(model, 0.05)
    ids = {id(p) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in ids) == p.requires_grad, name
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert any(p is model.logit_scale for p in no_decay["params"])


def test_resume_reproduces_the_uninterrupted_losses_exactly(make_config):
    straight = train(make_config("straight", checkpoint={"every": 0}))
    # same schedule (steps=6), but stop after step 3 as a job slot ending would; then relaunch
    cfg = make_config("interrupted", run={"stop_at_step": 3}, checkpoint={"every": 0})
    first = train(cfg)
    assert first.step == 3 and first.stopped_by_signal is None
    assert first.final_model_dir is None
    assert [s for s, _ in ckpt.list_checkpoints(ckpt.checkpoint_root(cfg.run.output_dir))] == [3]
    cfg.run.stop_at_step = 0
    second = train(cfg)
    assert second.resumed_from.endswith("step_00000003")
    assert second.step == 6
    for key in HISTORY_KEYS:
        assert second.history[key] == straight.history[key], key  # fp32 CPU: bit for bit
    for k, v in straight.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[k], v), k


def test_resume_with_loader_workers(make_config):
    # the data position travels through DataLoader worker processes too
    data = {"num_workers": 2}
    straight = train(make_config("w_straight", data=data, schedule={"steps": 4},
                                 checkpoint={"every": 0}))
    cfg = make_config("w_resumed", data=data, schedule={"steps": 4}, run={"stop_at_step": 1},
                      checkpoint={"every": 0})
    train(cfg)
    cfg.run.stop_at_step = 0
    second = train(cfg)
    assert second.history["loss"] == straight.history["loss"]


def test_gradient_accumulation_runs_and_counts_optimizer_steps(make_config):
    cfg = make_config("accum", optim={"grad_accum_steps": 2}, schedule={"steps": 2},
                      checkpoint={"every": 0, "save_on_exit": False},
                      run={"save_final_model": False})
    result = train(cfg)
    assert result.step == 2 and len(result.history["loss"]) == 2
    assert result.last_checkpoint is None
    assert not os.path.exists(ckpt.checkpoint_root(cfg.run.output_dir))


def test_resume_never_refuses_a_folder_with_checkpoints(make_config):
    cfg = make_config("never", schedule={"steps": 2}, checkpoint={"every": 0})
    train(cfg)
    cfg.checkpoint.resume = "never"
    with pytest.raises(ValueError, match="checkpoint.resume is 'never'"):
        train(cfg)


def test_dali_decoding_in_the_main_process_matches_pil(make_config):
    # With DALI the loader workers leave the JPEGs encoded and the trainer decodes them; the
    # world's images are already 32x32, where DALI and PIL decode identically (docs/data.md).
    pytest.importorskip("nvidia.dali")
    common = dict(schedule={"steps": 2}, checkpoint={"every": 0, "save_on_exit": False},
                  run={"save_final_model": False})
    pil = train(make_config("pil", data={"image_backend": "pil", "num_workers": 1}, **common))
    dali = train(make_config("dali", data={"image_backend": "dali", "num_workers": 1}, **common))
    assert dali.history["loss"] == pytest.approx(pil.history["loss"], rel=1e-6)
