"""The metric logger (console, JSON lines, TensorBoard) and the MFU estimate."""

import builtins
import json

import pytest
import torch

from unigen.training.config import LoggingConfig
from unigen.training.metrics import PEAK_FLOPS, MetricLogger, estimate_mfu, format_metrics, peak_flops, peak_memory_gib


def test_mfu_estimate():
    # 6 · N · tokens/s over the peak of all devices
    assert estimate_mfu(100e6, 1e5, 989e12, 8) == pytest.approx(6 * 100e6 * 1e5 / (989e12 * 8))
    assert estimate_mfu(100e6, 1e5, None, 1) is None
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
    names = [name for name, _, _ in PEAK_FLOPS]
    # "H100 PCIe" must be matched before the generic "H100" entry
    assert names.index("H100 PCIe") < names.index("H100")
    assert peak_memory_gib(torch.device("cpu")) > 0


def test_logger_writes_console_and_jsonl(tmp_path):
    lines = []
    log = MetricLogger(str(tmp_path), LoggingConfig(tensorboard=False), write=lines.append)
    log.log(10, {"loss/total": 1.5, "loss/cap": None, "lr": 1e-4, "mfu": None,
                 "samples_per_s": float("nan")})
    log.close()
    assert lines == ["step 10 | objective 1.5000 | lr 1.000e-04 | nan samples/s"]
    rec = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert rec == {"step": 10, "loss/total": 1.5, "loss/cap": None, "lr": 1e-4, "mfu": None,
                   "samples_per_s": None}  # NaN is not JSON: written as null


def test_logger_disabled_on_other_ranks(tmp_path):
    log = MetricLogger(str(tmp_path), LoggingConfig(), enabled=False, write=pytest.fail)
    log.log(1, {"loss/total": 1.0})
    log.event("x")
    log.close()
    assert list(tmp_path.iterdir()) == []


def test_tensorboard_missing_is_a_one_line_notice(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    lines = []
    log = MetricLogger(str(tmp_path), LoggingConfig(jsonl=False), write=lines.append)
    log.log(1, {"loss/total": 2.0})
    log.close()
    assert len(lines) == 2 and "tensorboard is not installed" in lines[0]
    assert format_metrics(1, {"loss/total": 2.0}) == lines[1]
