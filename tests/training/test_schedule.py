import pytest
import torch

from unigen.training.config import ScheduleConfig
from unigen.training.schedule import build_scheduler, lr_multiplier


def test_linear_warmup_then_linear_decay():
    cfg = ScheduleConfig(steps=10, warmup_steps=4, decay="linear")
    got = [lr_multiplier(s, cfg) for s in range(10)]
    # warm-up reaches the peak at step warmup-1; decay reaches 0 at the last step
    want = [0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    assert got == pytest.approx(want, abs=1e-12)


def test_min_lr_cosine_and_constant():
    cfg = ScheduleConfig(steps=6, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    vals = [lr_multiplier(s, cfg) for s in range(6)]
    assert vals[:2] == pytest.approx([0.5, 1.0])
    assert vals[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(vals[1:], vals[2:]))  # non-increasing after warm-up
    const = ScheduleConfig(steps=5, warmup_steps=0, decay="constant")
    assert [lr_multiplier(s, const) for s in range(5)] == [1.0] * 5


def test_paper_defaults_and_scheduler_drives_optimizer():
    cfg = ScheduleConfig(steps=10_000)  # §4.2: 2000 warm-up steps, linear decay
    assert cfg.warmup_steps == 2000 and cfg.decay == "linear"
    assert lr_multiplier(1999, cfg) == 1.0
    assert lr_multiplier(0, cfg) == pytest.approx(1 / 2000)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=1e-4)
    sched = build_scheduler(opt, ScheduleConfig(steps=4, warmup_steps=2))
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5e-4, 1e-4, 0.5e-4, 0.0])


def test_bad_schedule_values():
    with pytest.raises(ValueError, match="schedule.steps"):
        ScheduleConfig(steps=0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        ScheduleConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="step must be"):
        lr_multiplier(-1, ScheduleConfig())
