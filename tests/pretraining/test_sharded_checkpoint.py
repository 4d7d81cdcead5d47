"""checkpoint.format: sharded — the state written through torch.distributed.checkpoint, no
gathered weights, and a resume equal to the uninterrupted run (one process here; two gloo
processes under FSDP2 in test_distributed.py)."""

import os

import torch

from unigen.pretraining import HISTORY_KEYS
from unigen.train import train
from unigen.training import checkpointing as ckpt


def test_sharded_resume_reproduces_the_uninterrupted_run(make_config):
    steps = {"steps": 3, "warmup_steps": 1}
    straight = train(make_config("straight", schedule=steps, checkpoint={"every": 0}))
    cfg = make_config("sharded", schedule=steps, run={"stop_at_step": 1},
                      checkpoint={"every": 0, "format": "sharded"})
    train(cfg)
    (step, path), = ckpt.list_checkpoints(ckpt.checkpoint_root(cfg.run.output_dir))
    assert step == 1 and os.path.isdir(os.path.join(path, ckpt.SHARDED_DIR))
    assert not os.path.exists(os.path.join(path, ckpt.MODEL_DIR, "model.safetensors"))
    assert not os.path.exists(os.path.join(path, ckpt.OPTIMIZER_FILE))
    cfg.run.stop_at_step = 0
    resumed = train(cfg)
    assert resumed.resumed_from == path and resumed.step == 3
    for key in HISTORY_KEYS:
        assert resumed.history[key] == straight.history[key], key  # fp32 CPU: bit for bit
    for k, v in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[k], v), k
    assert os.path.isfile(os.path.join(resumed.final_model_dir, "model.safetensors"))  # full
