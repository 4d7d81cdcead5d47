"""PretrainConfig: paper defaults, cross-section validation, YAML + override round trip."""

import pytest

from unigen.configuration import ConfigError, load_config, save_config
from unigen.pretraining import PretrainConfig


def test_paper_defaults():
    cfg = PretrainConfig()
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.optim.weight_decay == 0.05
    assert cfg.schedule.warmup_steps == 2000 and cfg.schedule.decay == "linear"
    assert cfg.run.precision == "auto"  # bf16 on GPUs, fp32 on CPUs
    assert cfg.distributed.parallelism == "ddp"


def test_yaml_and_overrides_round_trip(make_config, tmp_path):
    path = save_config(make_config(), tmp_path / "c.yaml")
    cfg = load_config(PretrainConfig, path, ["--model.loss.alpha=0.5", "--optim.betas=0.9,0.95",
                                          "--data.ratios.qus=0.5", "--distributed.parallelism=fsdp"])
    assert cfg.model.loss.alpha == 0.5 and cfg.optim.betas == (0.9, 0.95)
    assert cfg.data.ratios["qus"] == 0.5 and cfg.distributed.parallelism == "fsdp"
    assert load_config(PretrainConfig, save_config(cfg, tmp_path / "d.yaml")) == cfg


@pytest.mark.parametrize("override, message", [
    ("--schedule.warmup_steps=10", "schedule.warmup_steps (10) exceeds schedule.steps (6)"),
    ("--data.max_target_len=200", "exceeds model.decoder.n_positions"),
    ("--data.max_encoder_len=30", "exceeds model.text.max_length (16)"),
    ("--optim.grad_accum_steps=0", "optim.grad_accum_steps must be an int >= 1"),
    ("--init.from_pretrained=x", None),
])
def test_cross_section_validation(make_config, tmp_path, override, message):
    path = save_config(make_config(), tmp_path / "c.yaml")
    if message is None:  # pre-trained weights replace the model section: no size checks
        assert load_config(PretrainConfig, path, [override]).init.from_pretrained == "x"
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(PretrainConfig, path, [override])


def test_epochs_need_the_image_shards(make_config, tmp_path):
    path = save_config(make_config(), tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="one pass over the image-text pairs of data.image_shards"):
        load_config(PretrainConfig, path, ["--schedule.steps=0", "--schedule.epochs=2",
                                           "--data.image_shards=[]", "--data.ratios.cap=0",
                                           "--data.ratios.qus=0", "--data.ratios.match=0"])


def test_epochs_become_steps_from_the_shards_sizes(make_config, train_world):
    """An epoch is as many samples as the image shards hold pairs: 120 pairs at 12 samples
    per micro-batch and 2 micro-batches per step are 5 steps; 3 epochs are 15."""
    from unigen.pretraining.recipe import PretrainRecipe
    from unigen.training.distributed import init_distributed, teardown_distributed
    from unigen.training.trainer import Trainer

    cfg = make_config(schedule={"steps": 0, "epochs": 3, "warmup_steps": 2},
                      optim={"grad_accum_steps": 2}, logging={"console": True})
    cfg.schedule.__post_init__()
    lines = []
    env = init_distributed(cfg.distributed, cfg.run)
    try:
        trainer = Trainer(PretrainRecipe(cfg), cfg, env, log=lines.append)
    finally:
        teardown_distributed(env)
    assert (trainer.micro_per_epoch, trainer.steps_per_epoch, trainer.total_steps) == (10, 5, 15)
    assert any("120 image-text pairs" in line for line in lines)
