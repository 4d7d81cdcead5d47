"""``python -m unigen.train``'s command line: config errors give a clear message and exit 2;
SIGINT/SIGTERM save a checkpoint and exit 0."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from unigen.configuration import save_config
from unigen.train import main


def _yaml(make_config, name="cli", **sections):
    cfg = make_config(name, **sections)
    path = os.path.join(os.path.dirname(cfg.run.output_dir), f"{name}.yaml")
    save_config(cfg, path)
    return cfg, path


@pytest.mark.parametrize("override, message", [
    ("--optim.learning_rate=3e-4", "unknown config key 'optim.learning_rate'"),
    ("--schedule.stpes=10", "did you mean 'steps'"),
    ("--optim.lr=fast", "bad value 'fast' for 'optim.lr'"),
    ("--distributed.parallelism=zero3", "'distributed.parallelism'"),
    ("--optim.grad_clip=-1", "optim.grad_clip must be"),
    ("--data.image_size=64", "data.image_size (64) must equal model.vision.image_size (32)"),
])
def test_bad_override_exits_2_with_a_message(make_config, capsys, override, message):
    _, path = _yaml(make_config)
    assert main(["--config", path, override]) == 2
    err = capsys.readouterr().err
    assert "unigen.train: error:" in err and message in err


def test_missing_config_file_and_missing_tokenizer(make_config, capsys, tmp_path):
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    _, path = _yaml(make_config)
    assert main(["--config", path, "--data.encoder_tokenizer=" + str(tmp_path / "none")]) == 2
    assert "data.encoder_tokenizer" in capsys.readouterr().err


def test_main_runs_with_overrides(make_config):
    cfg, path = _yaml(make_config)
    out = cfg.run.output_dir + "_main"
    assert main(["--config", path, f"--run.output_dir={out}", "--schedule.steps=2",
                 "--checkpoint.every=0"]) == 0
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_00000002"))
    assert os.path.isfile(os.path.join(out, "config.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(make_config, sig):
    cfg, path = _yaml(make_config, "signal", schedule={"steps": 100_000, "warmup_steps": 2},
                      logging={"every": 1, "console": True},
                      checkpoint={"every": 0})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "unigen.train", "--config", path],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    metrics = os.path.join(cfg.run.output_dir, "metrics.jsonl")
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until training is under way
            if os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 2:
                break
            if proc.poll() is not None:
                pytest.fail(f"training exited early:\n{proc.stdout.read()}")
            time.sleep(0.2)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert f"stopped by {sig.name}" in out
    steps = [json.loads(line)["step"] for line in open(metrics)]
    ckpts = os.listdir(os.path.join(cfg.run.output_dir, "checkpoints"))
    assert ckpts == [f"step_{steps[-1]:08d}"]  # saved at the step it stopped at
