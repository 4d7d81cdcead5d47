"""``python -m unigen.training.export``: a checkpoint's model as a from_pretrained folder from
either format — the way to go on with another number of processes — and the hint that names
it when a checkpoint is resumed with the wrong number."""

import os

import torch

from unigen.model.unigen_model import UniGen
from unigen.train import train
from unigen.training import checkpointing as ckpt
from unigen.training.export import main as export_main


def test_export_from_a_sharded_and_a_full_checkpoint(make_config, tmp_path, capsys):
    steps = {"steps": 2, "warmup_steps": 1}
    sharded = train(make_config("sharded", schedule=steps,
                                checkpoint={"every": 0, "format": "sharded"}))
    full = train(make_config("full", schedule=steps, checkpoint={"every": 0}))
    for result in (sharded, full):
        (_, path), = ckpt.list_checkpoints(ckpt.checkpoint_root(result.run_dir))
        out = str(tmp_path / f"export_{os.path.basename(result.run_dir)}")
        assert export_main([path, out]) == 0
        assert f"start a run from it with --init.from_pretrained={out}" in capsys.readouterr().out
        model = UniGen.from_pretrained(out)
        trained = result.model.state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, trained[k]), k
        assert model.decoder_tokenizer is not None
    # a second export into the same folder is refused, in one line
    assert export_main([path, out]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert export_main([str(tmp_path), str(tmp_path / "x")]) == 2
    assert "is no training checkpoint" in capsys.readouterr().err


def test_another_world_size_names_the_way_to_go_on(make_config, capsys):
    from unigen.train import main

    cfg = make_config("two", schedule={"steps": 2, "warmup_steps": 1}, checkpoint={"every": 0})
    train(cfg)
    (_, path), = ckpt.list_checkpoints(ckpt.checkpoint_root(cfg.run.output_dir))
    # as if two processes had written it
    state = torch.load(os.path.join(path, ckpt.TRAINER_FILE), weights_only=False)
    state["ranks"] = state["ranks"] * 2
    torch.save(state, os.path.join(path, ckpt.TRAINER_FILE))
    from unigen.configuration import save_config

    yaml_path = os.path.join(os.path.dirname(cfg.run.output_dir), "two.yaml")
    save_config(cfg, yaml_path)
    assert main(["--config", yaml_path]) == 2
    err = capsys.readouterr().err
    assert "was written by 2 processes, this run has 1" in err
    assert "relaunch with 2 (torchrun --nproc_per_node 2)" in err
    assert f"--init.from_pretrained={os.path.join(path, 'model')} starts one from its weights" in err
