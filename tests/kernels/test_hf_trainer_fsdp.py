"""Where people run the drop-in: ``transformers.Trainer`` with FSDP2 through accelerate, and TRL's
``SFTTrainer`` the same way, on 2 gloo processes under torchrun (CPU). The patched model's logged
losses equal the unpatched model's, step by step (gradient accumulation included: the Trainer's
``num_items_in_batch``)."""

import json
import os
import subprocess
import sys

import pytest
import torch.distributed as dist

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hf_trainer_worker.py")


def _losses(mode, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           WORKER, mode, str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=dict(os.environ, OMP_NUM_THREADS="1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("LOSSES "))
    return json.loads(line[len("LOSSES "):])


def _same(losses):
    plain, fused = losses["plain"], losses["fused"]
    assert len(plain) == len(fused) == 3
    assert plain[0] != plain[2]  # the model trained
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), losses


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.timeout(300)
def test_trainer_with_fsdp2_same_losses(tmp_path):
    _same(_losses("trainer", tmp_path))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.timeout(300)
def test_trl_sft_trainer_with_fsdp2_same_losses(tmp_path):
    """TRL's SFTTrainer (trl 1.16.0 in the dev lock; skips in an environment without trl)."""
    pytest.importorskip("trl")
    _same(_losses("sft", tmp_path))
