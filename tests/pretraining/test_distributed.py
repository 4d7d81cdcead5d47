"""Two processes under torchrun (gloo on CPU): DDP and FSDP2 training, checkpoint, resume, and
the same per-step losses as the uninterrupted two-process run."""

import os
import subprocess
import sys

import pytest
import torch

from unigen.configuration import save_config
from unigen.pretraining import HISTORY_KEYS
from unigen.training import checkpointing as ckpt

from .conftest import build_config

pytestmark = pytest.mark.slow


def _torchrun(config_path: str, *overrides: str) -> str:
    # Launched from the test's working directory (the checkout), as a user would: this also
    # covers unigen.train keeping the checkout's kernels/ folder off sys.path.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unigen.train", "--config", config_path, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


def _trainer_state(run_dir: str) -> dict:
    path = ckpt.latest_checkpoint(ckpt.checkpoint_root(run_dir))
    return torch.load(os.path.join(path, ckpt.TRAINER_FILE), weights_only=False)


@pytest.fixture(scope="module")
def ddp_run(train_world, tmp_path_factory):
    """The config file, and the uninterrupted two-process DDP run of it."""
    root = tmp_path_factory.mktemp("ddp")
    # one loader worker per rank: the data position is restored through a worker process too
    cfg = build_config(train_world, str(root / "straight"), data={"num_workers": 1},
                       checkpoint={"every": 0}, logging={"every": 1, "console": True})
    path = str(root / "ddp.yaml")
    save_config(cfg, path)
    out = _torchrun(path)
    return path, str(root), out, _trainer_state(cfg.run.output_dir)


def test_two_process_ddp_resume_matches_uninterrupted(ddp_run):
    path, root, out, straight = ddp_run
    assert out.count("step 6 |") == 1  # only rank 0 logs
    resumed_dir = os.path.join(root, "resumed")
    _torchrun(path, f"--run.output_dir={resumed_dir}", "--run.stop_at_step=3")
    out = _torchrun(path, f"--run.output_dir={resumed_dir}")
    assert "resumed from" in out and "step_00000003" in out
    resumed = _trainer_state(resumed_dir)
    assert straight["step"] == resumed["step"] == 6 and straight["world_size"] == 2
    assert len(straight["ranks"]) == 2  # each rank's RNG and data position
    # per-rank random sources: the hard-negative generators differ between the ranks
    g0, g1 = (straight["ranks"][r]["rng"]["generator"] for r in (0, 1))
    assert not torch.equal(g0, g1)
    for key in HISTORY_KEYS:
        assert resumed["history"][key] == straight["history"][key], key


def test_two_process_fsdp_resume_matches_ddp(ddp_run):
    path, root, _, ddp = ddp_run
    fsdp_dir = os.path.join(root, "fsdp")
    common = (f"--run.output_dir={fsdp_dir}", "--distributed.parallelism=fsdp")
    _torchrun(path, *common, "--run.stop_at_step=3")
    out = _torchrun(path, *common)
    assert "resumed from" in out
    fsdp = _trainer_state(fsdp_dir)
    assert fsdp["step"] == 6
    # FSDP2 reduce-scatters where DDP all-reduces: equal up to float rounding
    for key in ("loss", "cl", "trans", "cap", "qus", "match", "grad_norm"):
        assert fsdp["history"][key] == pytest.approx(ddp["history"][key], rel=1e-5), key


def test_two_process_fsdp_sharded_checkpoint_resume_matches_ddp(ddp_run):
    """checkpoint.format=sharded: each rank writes its own shards (torch.distributed.checkpoint),
    nothing gathered; the resumed run equals the uninterrupted one."""
    path, root, _, ddp = ddp_run
    run_dir = os.path.join(root, "fsdp_sharded")
    common = (f"--run.output_dir={run_dir}", "--distributed.parallelism=fsdp",
              "--checkpoint.format=sharded")
    _torchrun(path, *common, "--run.stop_at_step=3")
    saved = ckpt.latest_checkpoint(ckpt.checkpoint_root(run_dir))
    files = os.listdir(os.path.join(saved, ckpt.SHARDED_DIR))
    assert sum(f.endswith(".distcp") for f in files) == 2  # one file of shards per rank
    assert not os.path.exists(os.path.join(saved, ckpt.MODEL_DIR, "model.safetensors"))
    out = _torchrun(path, *common)
    assert "resumed from" in out
    state = _trainer_state(run_dir)
    assert state["step"] == 6
    for key in ("loss", "cl", "trans", "cap", "qus", "match", "grad_norm"):
        assert state["history"][key] == pytest.approx(ddp["history"][key], rel=1e-5), key


def test_two_process_random_mixing_with_uneven_pairs(ddp_run):
    """Random task draws give the ranks different numbers of image-text pairs per step, some
    none at all; the contrastive all-gather must still line up (no hang, no size mismatch)."""
    path, root, _, _ = ddp_run
    run_dir = os.path.join(root, "random_mixing")
    _torchrun(path, f"--run.output_dir={run_dir}", "--data.mixing=random", "--data.batch_size=3")
    state = _trainer_state(run_dir)
    assert state["step"] == 6
    assert all(v == v for v in state["history"]["loss"])  # finite, no nan


def test_two_process_extraction_then_training_from_the_store(ddp_run, tmp_path):
    """The feature store under torchrun: two processes extract their shares of the shards
    (the store equals one process's, bit for bit), then FSDP2 trains from it with the per-step
    losses of the DDP run from the images up to float rounding (FSDP2 reduce-scatters where DDP
    all-reduces; one process from a store is bit-exact, test_feature_store_training.py). One
    training run only: the whole suite must stay within its time on two cores."""
    from unigen.configuration import load_config
    from unigen.data.feature_store import FeatureStore
    from unigen.data.prepare import main as prepare
    from unigen.model.unigen_model import UniGen
    from unigen.pretraining import PretrainConfig
    from unigen.training.trainer import seed_everything

    path, _, _, ddp = ddp_run
    cfg = load_config(PretrainConfig, path)
    # The run's ViT: the weights its seeded random initialisation gives (Trainer seeds, then
    # builds the model), saved so the extraction can load them; the hash check proves it.
    seed_everything(cfg.run.seed)
    UniGen(cfg.model).save_pretrained(tmp_path / "init")
    cfg.init.from_pretrained = str(tmp_path / "init")
    extract_config = str(tmp_path / "extract.yaml")
    save_config(cfg, extract_config)
    store = str(tmp_path / "store")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unigen.data.prepare", "image-features", extract_config, "--out", store,
           "--dtype", "fp32", "--workers", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    # three shards: rank 0 takes the first and third, rank 1 the second
    assert "[rank 0/2]: 3 webdataset unit(s), this process takes 2" in proc.stdout
    assert "[rank 1/2]: 3 webdataset unit(s), this process takes 1" in proc.stdout
    assert "3 of 3 units (complete), 120 images" in proc.stdout  # rank 0, after both
    assert prepare(["image-features", extract_config, "--out", str(tmp_path / "one"),
                    "--dtype", "fp32", "--workers", "0"]) == 0
    two, one = FeatureStore(store), FeatureStore(tmp_path / "one")
    assert len(two) == len(one) == 120 and not two.missing_units
    assert all(torch.equal(two.lookup(k).values, one.lookup(k).values) for k in one._where)

    run_dir = str(tmp_path / "fsdp")
    _torchrun(path, f"--run.output_dir={run_dir}", f"--data.image_features={store}",
              "--distributed.parallelism=fsdp")
    fsdp = _trainer_state(run_dir)
    assert fsdp["step"] == 6
    for key in ("loss", "cl", "trans", "cap", "qus", "match", "grad_norm"):
        assert fsdp["history"][key] == pytest.approx(ddp["history"][key], rel=1e-5), key


def test_a_two_process_checkpoint_resumed_by_one_says_how_to_go_on(ddp_run, capsys):
    from unigen.train import main

    path, root, _, _ = ddp_run
    checkpoint = ckpt.latest_checkpoint(ckpt.checkpoint_root(os.path.join(root, "straight")))
    assert main(["--config", path]) == 2  # one process, the two-process run's folder
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was written by 2 processes, this run has 1" in err
    assert "relaunch with 2 (torchrun --nproc_per_node 2)" in err
    assert f"--init.from_pretrained={os.path.join(checkpoint, 'model')}" in err
