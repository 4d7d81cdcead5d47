"""The one training config: a nested ``@dataclass(kw_only=True)``.

YAML files and ``--section.key=value`` overrides are derived from it by
:mod:`unigen.configuration`; the resolved config is saved in the run folder. Defaults follow the
paper (§4.2): AdamW with β = (0.9, 0.98), weight decay 0.05, lr 1e-4, 2000 warm-up steps then
linear decay, mixed precision (bf16 on GPUs).

Sections::

    model        UniGenConfig        the network (unigen.model.config)
    init         InitConfig          where pre-trained weights come from
    data         DataConfig          the data pipeline (unigen.data.config)
    optim        OptimConfig         AdamW, gradient accumulation and clipping
    schedule     ScheduleConfig      run length, warm-up and decay
    run          RunConfig           run folder, seed, device, precision, compile
    checkpoint   CheckpointConfig    how often, how many, resume
    logging      LoggingConfig       console / JSON lines / TensorBoard
    distributed  DistributedConfig   backend, DDP or FSDP2
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from unigen.model.config import UniGenConfig
from unigen.data.config import DataConfig


def _positive_int(owner: str, name: str, value, *, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an int >= {low}, got {value!r}")


def _finite(owner: str, name: str, value, *, low: float | None = None,
            high: float | None = None, low_open: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        rng = ("" if low is None else f" {'>' if low_open else '>='} {low}") + \
              ("" if high is None else f" and <= {high}")
        raise ValueError(f"{owner}.{name} must be a finite number{rng}, got {value!r}")


@dataclass(kw_only=True)
class InitConfig:
    """Initial weights. All empty: random initialisation (tests, the demo). The paper starts
    from pre-trained CLIP ViT-L/14, BLIP-2's Q-Former, xlm-roberta-base and gpt2 (§3.1)."""

    from_pretrained: str = ""
    """A directory written by ``UniGen.save_pretrained``; its config.json replaces ``model``."""
    clip_dir: str = ""
    """Local Hugging Face CLIP ViT-L/14 directory (``UniGen.from_pretrained_parts``)."""
    xlmr_dir: str = ""
    """Local Hugging Face xlm-roberta-base directory."""
    gpt2_dir: str = ""
    """Local Hugging Face gpt2 directory."""
    qformer_checkpoint: str = ""
    """LAVIS BLIP-2 (ViT-L) checkpoint file holding the Q-Former."""

    def __post_init__(self):
        parts = any((self.clip_dir, self.xlmr_dir, self.gpt2_dir, self.qformer_checkpoint))
        if self.from_pretrained and parts:
            raise ValueError("init.from_pretrained and the pre-trained parts (init.clip_dir, "
                             "xlmr_dir, gpt2_dir, qformer_checkpoint) exclude each other")

    @property
    def uses_parts(self) -> bool:
        return any((self.clip_dir, self.xlmr_dir, self.gpt2_dir, self.qformer_checkpoint))


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW (paper §4.2). Only trainable parameters enter the optimizer: the frozen CLIP ViT
    and the frozen decoder blocks are left out."""

    lr: float = 1e-4
    """Peak learning rate (§4.2: 1e-4)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW β1, β2 (§4.2)."""
    eps: float = 1e-8
    """AdamW ε."""
    weight_decay: float = 0.05
    """Decoupled weight decay (§4.2) on matrices (ndim >= 2); biases, norm scales, the
    temperature and other 1-D parameters are not decayed (the usual nanoGPT/CLIP rule)."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """AdamW kernel: "auto" picks fused on CUDA, foreach elsewhere."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (each ``data.batch_size`` samples per rank)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _finite("optim", "lr", self.lr, low=0.0, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold two numbers, got {self.betas!r}")
        for b in self.betas:
            _finite("optim", "betas", b, low=0.0, high=0.999999999)
        _finite("optim", "eps", self.eps, low=0.0, low_open=True)
        _finite("optim", "weight_decay", self.weight_decay, low=0.0)
        _positive_int("optim", "grad_accum_steps", self.grad_accum_steps)
        _finite("optim", "grad_clip", self.grad_clip, low=0.0)


@dataclass(kw_only=True)
class ScheduleConfig:
    """Run length and learning-rate schedule: linear warm-up, then decay (§4.2: 2000 warm-up
    steps, linear decay)."""

    steps: int = 100_000
    """Optimizer steps of the whole run; the decay reaches its end here."""
    warmup_steps: int = 2000
    """Steps of linear warm-up from 0 to ``optim.lr`` (§4.2: 2000)."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape after warm-up (§4.2: linear)."""
    min_lr_ratio: float = 0.0
    """Learning rate at the last step, as a fraction of ``optim.lr``."""

    def __post_init__(self):
        _positive_int("schedule", "steps", self.steps)
        _positive_int("schedule", "warmup_steps", self.warmup_steps, allow_zero=True)
        _finite("schedule", "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)


@dataclass(kw_only=True)
class RunConfig:
    """Where the run lives and how it computes."""

    output_dir: str = "runs/unigen"
    """The run folder: resolved config, checkpoints, logs, the final model."""
    seed: int = 0
    """Seeds model initialisation (same on every rank) and the per-rank random sources
    (dropout, hard-negative sampling). The data order has its own ``data.seed``."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """"auto": the local GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Autocast dtype: "auto" is bf16 on GPUs (mixed precision, §4.2) and fp32 on CPUs."""
    compile: bool = False
    """``torch.compile`` the model before wrapping it for data parallelism."""
    validate_batches: int = 2
    """Check every batch's layout (``UniGenBatch.validate``, a few host syncs) for the first
    this-many steps; batches from the pipeline keep their layout after that."""
    save_final_model: bool = True
    """Write the final model with ``save_pretrained`` into ``<output_dir>/final_model``."""
    stop_at_step: int = 0
    """Stop after this optimizer step (checkpoint, exit 0) without changing the schedule,
    e.g. to fit a job's time slot; the next launch resumes. 0: run to ``schedule.steps``."""

    def __post_init__(self):
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError("run.output_dir must be a non-empty path")
        _positive_int("run", "stop_at_step", self.stop_at_step, allow_zero=True)
        _positive_int("run", "seed", self.seed, allow_zero=True)
        _positive_int("run", "validate_batches", self.validate_batches, allow_zero=True)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints: a folder ``<output_dir>/checkpoints/step_<N>`` written to a temporary name
    and renamed when complete, so a crash never leaves a half-written checkpoint behind."""

    every: int = 1000
    """Save every this-many optimizer steps (0: only at the end and on SIGINT/SIGTERM)."""
    keep_last: int = 3
    """Keep the newest this-many checkpoints, delete older ones (0 keeps all)."""
    resume: str = "auto"
    """"auto": continue from the newest checkpoint in the run folder when there is one;
    "never": start fresh (refused if the run folder holds checkpoints); or a checkpoint path."""
    save_on_exit: bool = True
    """Save at the end of the run and when SIGINT/SIGTERM stops it."""

    def __post_init__(self):
        _positive_int("checkpoint", "every", self.every, allow_zero=True)
        _positive_int("checkpoint", "keep_last", self.keep_last, allow_zero=True)
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError("checkpoint.resume must be 'auto', 'never' or a checkpoint path")


@dataclass(kw_only=True)
class LoggingConfig:
    """Rank 0 logs; every ``every`` steps it writes each task's loss, L_CL, τ, lr, samples/s,
    tokens/s, MFU and peak memory."""

    every: int = 10
    """Log every this-many optimizer steps (the metrics are averaged over them)."""
    console: bool = True
    """Print the log lines."""
    jsonl: bool = True
    """Append them to ``<output_dir>/metrics.jsonl``."""
    tensorboard: bool = True
    """Write TensorBoard scalars to ``<output_dir>/tensorboard`` (skipped with a notice when
    tensorboard is not installed)."""
    progress_bar: bool = True
    """A tqdm progress bar on rank 0 (off automatically when tqdm is missing)."""

    def __post_init__(self):
        _positive_int("logging", "every", self.every)


@dataclass(kw_only=True)
class DistributedConfig:
    """Data parallelism over the processes torchrun starts (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: "auto" is NCCL on GPUs and gloo on CPUs."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """"ddp": DistributedDataParallel (the default; the paper's model fits every GPU);
    "fsdp": FSDP2 ``fully_shard`` per decoder/encoder block then the root, for larger decoders."""
    find_unused_parameters: bool = True
    """DDP: tolerate parameters without a gradient in a step. Needed because a mixed batch may
    lack a task (no image → the Q-Former gets no gradient); turn off only when every batch
    holds every task (``data.mixing: interleave`` with a batch of at least 4 samples)."""
    bucket_cap_mb: int = 25
    """DDP gradient bucket size (MiB)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after the forward (saves memory, costs a gather)."""
    timeout_minutes: int = 30
    """Collective timeout of the process group."""

    def __post_init__(self):
        _positive_int("distributed", "bucket_cap_mb", self.bucket_cap_mb)
        _positive_int("distributed", "timeout_minutes", self.timeout_minutes)


@dataclass(kw_only=True)
class TrainConfig:
    """Everything ``python -m unigen.train`` needs (see the module docstring for sections)."""

    model: UniGenConfig = field(default_factory=UniGenConfig)
    """The network (paper §4.2 by default)."""
    init: InitConfig = field(default_factory=InitConfig)
    """Pre-trained weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources, task ratios, batch size per rank, loader workers."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and gradient handling."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Run length and learning-rate schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder, seed, device, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallelism."""

    def __post_init__(self):
        m, d = self.model, self.data
        # The pipeline must produce what the model reads: catch a mismatch here, before any
        # process starts, with the keys to change.
        if not self.init.from_pretrained and not self.init.clip_dir \
                and d.image_size != m.vision.image_size:
            raise ValueError(f"data.image_size ({d.image_size}) must equal "
                             f"model.vision.image_size ({m.vision.image_size})")
        if not self.init.from_pretrained and not self.init.xlmr_dir \
                and d.max_encoder_len > m.text.max_length:
            raise ValueError(f"data.max_encoder_len ({d.max_encoder_len}) exceeds "
                             f"model.text.max_length ({m.text.max_length})")
        if not self.init.from_pretrained and not self.init.gpt2_dir:
            longest = (m.qformer.num_query_tokens + d.max_encoder_len + 1 + d.max_target_len - 1)
            if longest > m.decoder.n_positions:
                raise ValueError(
                    f"the longest decoder sequence (queries {m.qformer.num_query_tokens} + "
                    f"data.max_encoder_len {d.max_encoder_len} + task token + "
                    f"data.max_target_len {d.max_target_len} - 1 = {longest}) exceeds "
                    f"model.decoder.n_positions ({m.decoder.n_positions})")
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds "
                             f"schedule.steps ({self.schedule.steps})")
