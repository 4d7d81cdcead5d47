"""Atomic checkpoint writes, keep-last-K, and refusal of incomplete checkpoints."""

import os

import pytest
import torch

from unigen.model.config import UniGenConfig
from unigen.model.pretrained import CheckpointError
from unigen.model.unigen_model import UniGen
from unigen.training import checkpointing as ckpt


@pytest.fixture(scope="module")
def model():
    return UniGen(UniGenConfig.tiny())


def _save(root, step, model, keep_last=0):
    return ckpt.save_checkpoint(root, step, model_config=model.config,
                                model_state=model.state_dict(),
                                optimizer_state={"state": {}, "param_groups": []},
                                trainer_state={"step": step}, keep_last=keep_last)


def test_keep_last_and_latest(tmp_path, model):
    root = str(tmp_path / "checkpoints")
    for step in (1, 2, 3, 4):
        _save(root, step, model, keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [3, 4]
    assert ckpt.latest_checkpoint(root).endswith("step_00000004")
    loaded = ckpt.load_checkpoint(ckpt.latest_checkpoint(root), model)
    assert loaded["trainer"] == {"step": 4}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded["model"][k], v)


def test_a_crash_mid_save_leaves_no_checkpoint_and_the_old_one_intact(tmp_path, model,
                                                                      monkeypatch):
    root = str(tmp_path / "checkpoints")
    _save(root, 1, model)
    real_save = torch.save

    def dying_save(obj, path, *a, **kw):
        if str(path).endswith(ckpt.TRAINER_FILE):
            raise OSError("disk full")
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ckpt.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        _save(root, 2, model)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [1]
    assert sorted(os.listdir(root)) == ["step_00000001"]  # the temporary folder is gone


def test_leftover_temporaries_are_ignored_and_cleared(tmp_path, model):
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000009-123").mkdir(parents=True)  # a save killed by SIGKILL
    assert ckpt.list_checkpoints(str(root)) == []
    assert ckpt.latest_checkpoint(str(root)) is None
    _save(str(root), 10, model)
    assert sorted(os.listdir(root)) == ["step_00000010"]


def test_incomplete_or_mismatched_checkpoint_is_refused(tmp_path, model):
    root = str(tmp_path / "checkpoints")
    path = _save(root, 1, model)
    os.remove(os.path.join(path, ckpt.OPTIMIZER_FILE))
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        ckpt.load_checkpoint(path, model)
    path = _save(root, 2, model)
    other = UniGen(UniGenConfig.tiny(decoder=UniGenConfig.tiny().decoder.__class__.tiny(n_layer=2,
                                                                                      frozen_layers=(1,))))
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.load_checkpoint(path, other)


def test_rng_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    state = ckpt.capture_rng_state(torch.device("cpu"), gen)
    a = (torch.rand(3), torch.rand(2, generator=gen))
    torch.manual_seed(123)
    gen.manual_seed(9)
    ckpt.restore_rng_state(state, torch.device("cpu"), gen)
    b = (torch.rand(3), torch.rand(2, generator=gen))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
