"""The training core's config sections: validation with the key named."""

import pytest

from unigen.training.config import OptimConfig, ScheduleConfig


def test_bad_optim_values():
    with pytest.raises(ValueError, match="optim.betas"):
        OptimConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="optim.lr"):
        OptimConfig(lr=0.0)


def test_the_run_length_is_steps_or_epochs():
    assert ScheduleConfig(steps=0, epochs=3, warmup_steps=0).epochs == 3
    for kw in ({"steps": 0, "epochs": 0}, {"steps": 5, "epochs": 2}):
        with pytest.raises(ValueError, match="exactly one of schedule.steps"):
            ScheduleConfig(warmup_steps=0, **kw)
    with pytest.raises(ValueError, match=r"schedule.warmup_steps \(10\) exceeds schedule.steps \(6\)"):
        ScheduleConfig(steps=6, warmup_steps=10)
