"""A relaunch against its checkpoint's config: a change that alters the run stops the launch with
one line naming the keys and the flag that accepts them; accepted changes resume with the new
values; the run's length can never fall behind the checkpoint; every launch's resolved config
is kept; a run never ends without saying whether it wrote its final model."""

import os

import pytest
import yaml

from unigen.configuration import ConfigError, config_to_dict
from unigen.training.config import CheckpointConfig, OptimConfig, RunConfig, ScheduleConfig
from unigen.training.resume import LAUNCH_KEYS, check_resume_config, config_changes, covers

from .test_trainer import LineRecipe, config, fit


def _steps(out, steps, **sections):
    return config(out, schedule=ScheduleConfig(steps=steps, warmup_steps=0), **sections)


def test_config_changes_names_the_leaves_that_differ():
    now = _steps("runs/a", 8, optim=OptimConfig(lr=0.2, grad_accum_steps=2, grad_clip=0.0))
    before = config_to_dict(_steps("runs/a", 12))
    changes = {k: (a, b) for k, a, b in config_changes(before, now)}
    assert changes == {"schedule.steps": (12, 8), "optim.lr": (0.1, 0.2)}
    # a key the checkpoint's config did not have (an older version of the code) is not compared
    del before["optim"]["lr"]
    assert [k for k, _, _ in config_changes(before, now)] == ["schedule.steps"]
    assert covers(("schedule",), "schedule.steps") and not covers(("schedule.step",),
                                                                    "schedule.steps")


def test_launch_keys_differ_freely_and_fixed_keys_are_never_accepted():
    saved = config_to_dict(_steps("runs/a", 12))
    launch = _steps("runs/b", 12, run=RunConfig(output_dir="runs/b", device="cpu",
                                                  precision="fp32", stop_at_step=3),
                    checkpoint=CheckpointConfig(every=5, keep_last=1))
    assert covers(LAUNCH_KEYS, "run.stop_at_step")
    assert check_resume_config(saved, launch, checkpoint="ckpt") == []
    longer = _steps("runs/a", 20)
    with pytest.raises(ValueError, match=r"^ckpt was written with another config: schedule.steps "
                                         r"12 → 20; .* pass --checkpoint.accept_changes="
                                         r"schedule.steps to resume with the new ones"):
        check_resume_config(saved, longer, checkpoint="ckpt")
    assert check_resume_config(saved, longer, checkpoint="ckpt", accepted=("schedule",)) == \
        [("schedule.steps", 12, 20)]
    with pytest.raises(ValueError, match="schedule.steps 12 → 20 cannot change when resuming") as e:
        check_resume_config(saved, longer, checkpoint="ckpt", accepted=("schedule",),
                            fixed=("schedule.steps",), new_run_hint="--model X starts one")
    assert "accept_changes" not in str(e.value) and str(e.value).endswith("(--model X starts one)")


def test_a_shorter_schedule_is_refused_not_silently_ended(tmp_path, capsys):
    out = tmp_path / "run"
    first = fit(LineRecipe(), _steps(out, 6))
    assert first.step == 6 and first.final_model_dir is None  # the toy recipe writes no model
    config_yaml = (out / "config.yaml").read_text()
    # the case: a relaunch with a shorter schedule used to exit 0, "done", no model
    with pytest.raises(ConfigError) as e:
        fit(LineRecipe(), _steps(out, 3))
    message = str(e.value)
    assert "\n" not in message and "schedule.steps 6 → 3" in message
    assert "--checkpoint.accept_changes=schedule.steps" in message
    # accepted, a length below the checkpoint's step is still no run
    with pytest.raises(ConfigError, match="is at step 6, past this run's 3 steps"):
        fit(LineRecipe(), _steps(out, 3, checkpoint=CheckpointConfig(
            every=0, keep_last=0, accept_changes=("schedule.steps",))))
    # the refused launches changed nothing: one launch recorded, config.yaml as written
    assert sorted(os.listdir(out / "launches")) == ["launch_001.yaml"]
    assert (out / "config.yaml").read_text() == config_yaml


def test_an_accepted_longer_schedule_resumes_with_the_new_values(tmp_path):
    out = tmp_path / "run"
    fit(LineRecipe(), _steps(out, 6))
    lines = []
    longer = _steps(out, 10, checkpoint=CheckpointConfig(every=0, keep_last=0,
                                                         accept_changes=("schedule.steps",)),
                    logging=config(out).logging.__class__(every=1, console=True,
                                                          tensorboard=False, progress_bar=False))
    result = fit(LineRecipe(), longer, log=lines.append)
    assert result.resumed_from.endswith("step_00000006") and result.step == 10
    assert "[toy] resuming with schedule.steps 6 → 10 (checkpoint.accept_changes)" in lines
    # the decay follows the new length from step 6 on: linear to 0 at the last step
    assert result.history["lr"][-1] == pytest.approx(0.1 * (1 - 10 / 10), abs=1e-12)
    assert result.history["lr"][6] == pytest.approx(0.1 * (1 - 7 / 10))
    # every launch's resolved config is kept; config.yaml stays the first launch's
    assert sorted(os.listdir(out / "launches")) == ["launch_001.yaml", "launch_002.yaml"]
    assert yaml.safe_load((out / "config.yaml").read_text())["schedule"]["steps"] == 6
    second = yaml.safe_load((out / "launches" / "launch_002.yaml").read_text())
    assert second["schedule"]["steps"] == 10
    assert second["checkpoint"]["accept_changes"] == ["schedule.steps"]
    assert result.launch_config.endswith("launch_002.yaml")


def test_every_end_says_whether_the_final_model_was_written(tmp_path):
    logging = config(tmp_path).logging.__class__(every=1, console=True, tensorboard=False,
                                                 progress_bar=False)
    out = tmp_path / "stop"
    lines = []
    stopped = fit(LineRecipe(), _steps(out, 6, run=RunConfig(output_dir=str(out), device="cpu",
                                                               precision="fp32", stop_at_step=2),
                                       logging=logging), log=lines.append)
    assert ("[toy] final model: not written, the run is not complete (the next launch resumes "
            f"from it; newest checkpoint {stopped.last_checkpoint})") in lines
    lines.clear()
    fit(LineRecipe(), _steps(out, 6, logging=logging), log=lines.append)
    # the toy recipe writes no model: the summary says so instead of staying silent
    assert "[toy] final model: not written (toy writes none); the weights are in " \
           f"{out / 'checkpoints' / 'step_00000006' / 'model'}" in lines
    lines.clear()
    fit(LineRecipe(), _steps(out, 6, logging=logging), log=lines.append)
    assert "[toy] the run was already complete at step 6: nothing to train" in lines


def test_an_accepted_learning_rate_is_the_one_trained_with(tmp_path):
    # loading the checkpoint's optimizer state also loads the lr it was saved with: the new
    # one must win, from the first resumed step
    out = tmp_path / "run"
    fit(LineRecipe(), _steps(out, 6, run=RunConfig(output_dir=str(out), device="cpu",
                                                     precision="fp32", stop_at_step=3)))
    faster = _steps(out, 6, optim=OptimConfig(lr=0.4, grad_accum_steps=2, grad_clip=0.0),
                    checkpoint=CheckpointConfig(every=0, keep_last=0, accept_changes=("optim",)))
    result = fit(LineRecipe(), faster)
    assert result.history["lr"][:3] == pytest.approx([0.1 * (1 - s / 6) for s in (1, 2, 3)])
    assert result.history["lr"][3:] == pytest.approx([0.4 * (1 - s / 6) for s in (4, 5, 6)])
