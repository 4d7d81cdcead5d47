"""``configs/tiny.yaml``: one command from a fresh clone to a small pre-training run — the
synthetic world and its tokenizers made on the first launch and reused after, sizes that agree,
a schedule that fits — with a banner before the first step and a summary at the end; the same
under torchrun with two processes, where DDP's unused-parameter search is off (and silent)."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from unigen.configuration import load_config
from unigen.pretraining import PretrainConfig
from unigen.train import main

# The preset, made smaller still for a test: a world of 60 images and a 4-step schedule.
SMALL = ["--synthetic.num_images=60", "--synthetic.num_text_pairs=30",
         "--synthetic.num_eval_images=4", "--synthetic.text_vocab_size=300",
         "--synthetic.decoder_vocab_size=300", "--schedule.steps=4", "--schedule.warmup_steps=1",
         "--checkpoint.every=2", "--logging.every=2", "--logging.tensorboard=false",
         "--data.batch_size=8"]


def test_the_preset_is_a_run_that_fits():
    cfg = load_config(PretrainConfig, "configs/tiny.yaml")
    assert cfg.synthetic.dir and not cfg.data.image_shards  # the world supplies the data
    s = cfg.schedule
    assert s.steps <= 1000 and 0 < s.warmup_steps <= s.steps // 5  # ~30 s on 2 idle cores
    assert cfg.checkpoint.every <= s.steps and cfg.logging.every <= cfg.checkpoint.every
    assert cfg.data.mixing == "interleave" and cfg.run.cpu_threads == 1
    # by name too, as an installed wheel finds it from any folder
    assert load_config(PretrainConfig, "tiny") == cfg


def test_one_command_makes_the_world_trains_and_says_so(tmp_path, capsys):
    world, run = str(tmp_path / "world"), str(tmp_path / "run")
    argv = ["--config", "configs/tiny.yaml", f"--synthetic.dir={world}",
            f"--run.output_dir={run}", *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"[unigen.train] synthetic world: wrote the world and the "
                               f"tokenizers into {world}")
    # the banner, before the first log line: length, samples, device, the model, the data
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step 2 |"))
    banner = "\n".join(lines[:first_step])
    assert "4 steps × 8 samples = 32 samples, on cpu (fp32, 1 thread(s) per process)" in banner
    assert "randomly initialised (decoder vocabulary" in banner
    assert "tasks trans 1, cap 1, qus 1, match 1 (interleave mixing)" in banner
    assert f"run folder {run} (launch 1, config {run}/launches/launch_001.yaml)" in banner
    # the sizes agree: the model took the tokenizers' vocabularies
    resolved = yaml.safe_load(open(os.path.join(run, "config.yaml")))
    with open(os.path.join(world, "tokenizers", "tokenizers.json")) as f:
        sizes = json.load(f)
    assert resolved["model"]["decoder"]["vocab_size"] == sizes["decoder_vocab_size"]
    assert resolved["model"]["text"]["vocab_size"] == sizes["text_vocab_size"]
    assert resolved["data"]["image_shards"] and resolved["data"]["encoder_tokenizer"]
    # the summary: final losses, time, samples/s, where everything is
    assert "[unigen.train] finished at step 4 of 4: 4 steps in" in out
    assert "samples/s" in out
    assert "final losses (mean of the last 2 steps): objective " in out and "| cl " in out
    assert f"[unigen.train] final model: {run}/final_model" in out
    assert f"metrics {run}/metrics.jsonl" in out and f"loss curve {run}/loss_curve.png" in out
    assert os.path.isfile(os.path.join(run, "final_model", "model.safetensors"))
    assert os.path.getsize(os.path.join(run, "loss_curve.png")) > 1000

    # a second run reuses the world and its tokenizers
    assert main(argv[:-len(SMALL)] + [f"--run.output_dir={run}2", *SMALL]) == 0
    assert f"[unigen.train] synthetic world: reusing {world}" in capsys.readouterr().out
    # ... and one with other world settings is refused, naming them, before any run folder
    assert main(argv[:-len(SMALL)] + [f"--run.output_dir={run}3", *SMALL,
                                      "--synthetic.num_images=70"]) == 2
    err = capsys.readouterr().err
    assert "synthetic.dir: " in err and "num_images 60, not 70" in err
    assert not os.path.exists(f"{run}3")


def test_synthetic_dir_and_own_data_exclude_each_other(tmp_path, capsys):
    argv = ["--config", "configs/tiny.yaml", f"--synthetic.dir={tmp_path / 'world'}",
            f"--run.output_dir={tmp_path / 'run'}", *SMALL,
            f"--data.encoder_tokenizer={tmp_path / 'mine'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "data.encoder_tokenizer is set" in err and "clear one of them" in err
    assert main(["--config", "configs/tiny.yaml", "--init.from_pretrained=some/model"]) == 2
    assert "synthetic.dir trains its own tiny tokenizers" in capsys.readouterr().err


@pytest.mark.slow
def test_the_preset_under_torchrun_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unigen.train", "--config", "configs/tiny.yaml",
           f"--synthetic.dir={tmp_path / 'world'}", f"--run.output_dir={tmp_path / 'run'}", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # rank 0 made the world while rank 1 waited; one banner, one summary
    assert out.count("synthetic world: wrote the world") == 1
    assert "4 steps × 16 samples (8 per process × 2 processes) = 64 samples" in out
    assert "2 processes, DDP, unused-parameter search off (auto)" in out
    assert out.count("final model: ") == 1
    # every batch holds a [match] sample: nothing unused, so no search and no warning about it
    assert "find_unused_parameters=True" not in out
    assert os.path.isfile(os.path.join(tmp_path, "run", "final_model", "model.safetensors"))
