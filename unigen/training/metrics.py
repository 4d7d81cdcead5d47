"""Rank-0 metrics: console lines, a JSON-lines file, TensorBoard scalars, and an MFU estimate.

MFU (model FLOPs utilisation) follows nanoGPT/PaLM's rough count: a training step costs about
``6 · N · T`` FLOPs for ``N`` trainable parameters and ``T`` tokens (forward 2NT, backward 4NT),
divided by the device's peak dense FLOP/s times the number of devices. Here ``T`` counts the
decoder targets plus the encoder inputs (text tokens and Q-Former queries), and the frozen
ViT/decoder blocks are left out of ``N``: it is an estimate for comparing runs, not a profile.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys

import torch

# Peak dense tensor-core FLOP/s per device: (bf16/fp16, tf32). Sources: the vendors' data
# sheets (dense, no sparsity). Matched by substring of torch.cuda.get_device_name(), first hit.
PEAK_FLOPS = (
    ("H200", 989e12, 494e12),
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 494e12),   # SXM / NVL
    ("GH200", 989e12, 494e12),
    ("B200", 2250e12, 1100e12),
    ("A100", 312e12, 156e12),
    ("A800", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
    ("L4", 121e12, 60e12),
    ("A10", 125e12, 62.5e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("V100", 125e12, None),
    ("T4", 65e12, None),
)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of one device for ``dtype`` (None on CPUs and unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, half, tf32 in PEAK_FLOPS:
        if key in name:
            return half if dtype in (torch.bfloat16, torch.float16) else tf32
    return None


def estimate_mfu(num_params: int, tokens_per_second: float, peak_per_device: float | None,
                 world_size: int) -> float | None:
    if not peak_per_device or tokens_per_second <= 0:
        return None
    return 6.0 * num_params * tokens_per_second / (peak_per_device * world_size)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPUs (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)




class MetricLogger:
    """Writes metric dicts to the console, ``metrics.jsonl`` and TensorBoard. Construct with
    ``enabled=False`` on ranks other than 0: every method is then a no-op.

    ``resume_step``: the run continues from a checkpoint of this step, so the JSON-lines lines
    of later steps (logged before a crash, redone now) are dropped first: every step is in the
    file once. ``name`` prefixes the event lines.
    """

    def __init__(self, output_dir: str, cfg, *, enabled: bool = True, write=print,
                 resume_step: int | None = None, name: str = "unigen.train"):
        self.enabled = enabled
        self.cfg = cfg
        self.write = write
        self.name = name
        self._jsonl = None
        self._tb = None
        self.tensorboard_dir: str | None = None
        """Where the TensorBoard scalars go (None: not written)."""
        if not enabled:
            return
        if cfg.jsonl:
            path = os.path.join(output_dir, "metrics.jsonl")
            if resume_step is not None and os.path.isfile(path):
                _keep_steps_up_to(path, resume_step)
            self._jsonl = open(path, "a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.write(f"[{name}] tensorboard is not installed: TensorBoard logging "
                           "skipped (pip install tensorboard)")
            else:
                self.tensorboard_dir = os.path.join(output_dir, "tensorboard")
                self._tb = SummaryWriter(self.tensorboard_dir)

    def log(self, step: int, metrics: dict) -> None:
        """A log line: console, JSON lines, TensorBoard."""
        if not self.enabled:
            return
        if self.cfg.console:
            self.write(format_metrics(step, metrics))
        self.record(step, metrics)

    def record(self, step: int, data: dict) -> None:
        """JSON lines and TensorBoard only (e.g. an evaluation the recipe reports itself);
        nested dicts become ``a/b`` scalars in TensorBoard."""
        if not self.enabled:
            return
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **_clean(data)}, ensure_ascii=False)
                              + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in _scalars(data):
                self._tb.add_scalar(k, v, step)

    def event(self, text: str) -> None:
        """A one-off line (checkpoint saved, resumed, stopped)."""
        if self.enabled and self.cfg.console:
            self.write(f"[{self.name}] {text}")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _scalars(data: dict, prefix: str = ""):
    for k, v in data.items():
        key = f"{prefix}{k}".replace(".", "/")
        if isinstance(v, dict):
            yield from _scalars(v, key + "/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield key, v


def _keep_steps_up_to(path: str, step: int) -> None:
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def format_metrics(step: int, m: dict) -> str:
    parts = [f"step {step}" + (f" (epoch {m['epoch']})" if m.get("epoch") is not None else "")]
    loss_keys = [k for k in m if k.startswith("loss/")]
    for k in loss_keys:
        if m[k] is not None:
            # "loss/total" is the objective the optimizer sees (the recipe's weighted sum, per
            # step); the per-task values beside it are means over their own tokens, so they do
            # not add up to it: the label says which is which.
            parts.append(f"{'objective' if k == 'loss/total' else k[5:]} {m[k]:.4f}")
    for key, fmt in (("temperature", "τ {:.4f}"), ("lr", "lr {:.3e}"),
                     ("samples_per_s", "{:.1f} samples/s"), ("tokens_per_s", "{:.0f} tok/s"),
                     ("mfu", "mfu {:.1%}"), ("peak_mem_gib", "mem {:.2f} GiB")):
        if m.get(key) is not None:
            parts.append(fmt.format(m[key]))
    if m.get("data/dropped_total"):
        parts.append(f"dropped: {m['data/dropped_total']}")
    return " | ".join(parts)
