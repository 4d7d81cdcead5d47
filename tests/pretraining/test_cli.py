"""``python -m unigen.train``'s command line: config errors give a clear message and exit 2;
SIGINT/SIGTERM save a checkpoint and exit 0."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from unigen.configuration import save_config
from unigen.train import main
from unigen.training.checkpointing import checkpoint_root, list_checkpoints


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


def _error_line(err: str) -> str:
    """The one line a data or config problem prints (no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("unigen.train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _start_problem(case, world, tmp_path):
    src = world.wikimatrix[0]
    if case == "wikimatrix_name":
        bad = tmp_path / "wm_de.tsv.gz"
        shutil.copy(src, bad)
        return f"--data.wikimatrix={bad}", "WikiMatrix file names must look like"
    if case == "no_english_side":
        bad = tmp_path / "WikiMatrix.de-fr.tsv.gz"
        shutil.copy(src, bad)
        return f"--data.wikimatrix={bad}", "pair de-fr has no 'en' side"
    if case == "unreadable_shard":
        bad = tmp_path / "broken.tar"
        bad.write_bytes(b"this is not a tar archive" * 40)
        return f"--data.image_shards={bad}", "broken.tar: not a readable tar archive (method tar: "
    bad = tmp_path / "none.jsonl"
    return f"--data.ccqa={bad}", "data.ccqa: no such file or directory"


@pytest.mark.parametrize("case", ["wikimatrix_name", "no_english_side", "unreadable_shard",
                                  "missing_file"])
def test_data_problems_known_at_start_exit_2_before_a_run_folder(make_config, train_world,
                                                                 tmp_path, capsys, case):
    override, message = _start_problem(case, train_world[0], tmp_path)
    cfg, path = _yaml(make_config, f"start_{case}")
    assert main(["--config", path, override]) == 2
    assert message in _error_line(capsys.readouterr().err)
    assert not os.path.exists(cfg.run.output_dir)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_one_line(make_config, capsys):
    cfg, path = _yaml(make_config, "nocuda")
    assert main(["--config", path, "--run.device=cuda"]) == 2
    assert "run.device is 'cuda' but this machine has no usable CUDA device" in \
        _error_line(capsys.readouterr().err)
    assert not os.path.exists(cfg.run.output_dir)


@pytest.mark.parametrize("workers", [0, 1], ids=["in_process", "loader_worker"])
def test_a_malformed_line_mid_run_checkpoints_then_exits_2(make_config, train_world, tmp_path,
                                                           capsys, workers):
    world, _ = train_world
    lines = open(world.ccqa, encoding="utf-8").read().splitlines()
    lines[29] = '{"key": broken'
    bad = tmp_path / "qa.jsonl"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg, path = _yaml(make_config, f"midrun_{workers}", schedule={"steps": 40, "warmup_steps": 2},
                      checkpoint={"every": 0}, data={"ccqa": (str(bad),), "num_workers": workers})
    assert main(["--config", path]) == 2
    assert f"{bad}:30: not valid JSON" in _error_line(capsys.readouterr().err)
    saved = [s for s, _ in list_checkpoints(checkpoint_root(cfg.run.output_dir))]
    assert len(saved) == 1 and 1 <= saved[0] < 40  # the steps done before the bad line


def _corrupt_images(src: str, dst, count: int | None) -> list[str]:
    """A copy of shard ``src`` whose first ``count`` images (all when None) do not decode;
    returns their keys."""
    keys = []
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name.endswith(".jpg") and (count is None or len(keys) < count):
                data = b"\xff\xd8\xff\xe0 not a jpeg" * 8
                keys.append(m.name.rsplit(".", 1)[0])
            info = tarfile.TarInfo(m.name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return keys


def test_dropped_samples_are_reported_once_and_counted(make_config, train_world, tmp_path,
                                                       capsys):
    world, _ = train_world
    shard = str(tmp_path / "two_corrupt.tar")
    keys = _corrupt_images(world.image_shards[0], shard, 2)
    cfg, path = _yaml(make_config, "drops", data={
        "image_shards": (shard, *world.image_shards[1:]), "max_dropped_fraction": 0.5},
        logging={"every": 2, "console": True, "progress_bar": False, "tensorboard": False})
    assert main(["--config", path]) == 0
    out = capsys.readouterr().out
    reported = [line.split("does not decode: ", 1)[1].split(" (")[0] for line in out.splitlines()
                if "dropped a sample whose image does not decode" in line]
    assert sorted(reported) == sorted(f"{shard}[{k}]" for k in keys)  # each image once
    logged = [json.loads(x) for x in open(os.path.join(cfg.run.output_dir, "metrics.jsonl"))]
    total = logged[-1]["data/dropped_total"]
    assert total >= 2 and total == sum(x["data/dropped"] for x in logged)
    assert f"dropped: {total}" in out


def test_a_run_that_drops_too_many_samples_stops_saying_why(make_config, train_world, tmp_path,
                                                            capsys):
    world, _ = train_world
    shard = str(tmp_path / "all_corrupt.tar")
    _corrupt_images(world.image_shards[0], shard, None)
    cfg, path = _yaml(make_config, "all_dropped", data={"image_shards": (shard,)},
                      schedule={"steps": 40, "warmup_steps": 2})
    assert main(["--config", path]) == 2
    line = _error_line(capsys.readouterr().err)
    assert "image samples drawn so far were dropped (100.0%)" in line
    assert "data.max_dropped_fraction = 5.0%" in line


def test_the_world_scores_of_a_trained_model_from_the_command_line(make_config, train_world,
                                                                   tmp_path, capsys):
    from unigen.scoring.world import main as world_main

    world, _ = train_world
    cfg, path = _yaml(make_config, "scored", schedule={"steps": 2, "warmup_steps": 1},
                      checkpoint={"every": 0})
    assert main(["--config", path]) == 0
    model_dir = os.path.join(cfg.run.output_dir, "final_model")
    out = tmp_path / "scores.json"
    capsys.readouterr()
    assert world_main(["--model", model_dir, "--world", world.root, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert [s["language"] for s in scores] == list(world.languages)
    assert "8 held-out images; R@1 chance 12.5%" in printed
    assert all(0.0 <= s["i2t_contrastive"] <= 1.0 for s in scores)
    assert world_main(["--model", model_dir, "--world", str(tmp_path)]) == 2
    assert "no world.json" in capsys.readouterr().err
    assert world_main(["--help"]) == 0 and "--world  str (required)" in capsys.readouterr().out
