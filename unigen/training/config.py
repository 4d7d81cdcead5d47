"""The training core's config sections, shared by every recipe (pre-training, IGLUE
fine-tuning): nested ``@dataclass(kw_only=True)`` classes.

A recipe's config holds these sections under these names, next to its own (``model``, ``data``,
...); YAML files and ``--section.key=value`` overrides are derived from it by
:mod:`unigen.configuration`, and the resolved config is saved in the run folder. A recipe may
declare a section with other defaults (fine-tuning's ``optim`` starts at lr 3e-5); the loader
keeps them. The defaults here follow the paper's pre-training (§4.2): AdamW with β = (0.9,
0.98), weight decay 0.05, lr 1e-4, 2000 warm-up steps then linear decay, mixed precision (bf16
on GPUs).

Sections::

    optim        OptimConfig         AdamW, gradient accumulation and clipping
    schedule     ScheduleConfig      run length (steps or epochs), warm-up and decay
    run          RunConfig           run folder, seed, device, precision, compile, stop_at_step
    checkpoint   CheckpointConfig    how often, how many, resume
    logging      LoggingConfig       console / JSON lines / TensorBoard / progress bar
    distributed  DistributedConfig   backend, DDP or FSDP2
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from unigen.configuration import check_choices, check_int, check_number


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW (paper §4.2). Only trainable parameters enter the optimizer: the frozen CLIP ViT
    and the frozen decoder blocks are left out."""

    lr: float = 1e-4
    """Peak learning rate (§4.2: 1e-4 for pre-training)."""
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
    """Micro-batches per optimizer step (each one batch per process). With epochs, the last
    step of an epoch takes the micro-batches left."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""

    def __post_init__(self):
        check_choices(self, "optim")
        self.betas = tuple(self.betas)
        check_number("optim", "lr", self.lr, low=0.0, low_open=True)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must hold two numbers, got {self.betas!r}")
        for b in self.betas:
            check_number("optim", "betas", b, low=0.0, high=0.999999999)
        check_number("optim", "eps", self.eps, low=0.0, low_open=True)
        check_number("optim", "weight_decay", self.weight_decay, low=0.0)
        check_int("optim", "grad_accum_steps", self.grad_accum_steps)
        check_number("optim", "grad_clip", self.grad_clip, low=0.0)


@dataclass(kw_only=True)
class ScheduleConfig:
    """Run length and learning-rate schedule: linear warm-up, then decay (§4.2: 2000 warm-up
    steps, linear decay)."""

    steps: int = 100_000
    """Optimizer steps of the whole run; the decay reaches its end here. 0 when ``epochs``
    sets the length instead."""
    epochs: int = 0
    """Passes over the training data, for recipes whose data is finite (fine-tuning): the run
    takes ``epochs × steps per epoch`` steps. 0 when ``steps`` sets the length."""
    warmup_steps: int = 2000
    """Steps of linear warm-up from 0 to ``optim.lr`` (§4.2: 2000)."""
    decay: Literal["linear", "cosine", "constant"] = "linear"
    """Shape after warm-up (§4.2: linear)."""
    min_lr_ratio: float = 0.0
    """Learning rate at the last step, as a fraction of ``optim.lr``."""

    def __post_init__(self):
        check_choices(self, "schedule")
        check_int("schedule", "steps", self.steps, low=0)
        check_int("schedule", "epochs", self.epochs, low=0)
        if (self.steps > 0) == (self.epochs > 0):
            raise ValueError(f"exactly one of schedule.steps ({self.steps}) and schedule.epochs "
                             f"({self.epochs}) sets the run's length: make the other 0")
        check_int("schedule", "warmup_steps", self.warmup_steps, low=0)
        check_number("schedule", "min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        if self.steps and self.warmup_steps > self.steps:
            raise ValueError(f"schedule.warmup_steps ({self.warmup_steps}) exceeds "
                             f"schedule.steps ({self.steps})")


@dataclass(kw_only=True)
class RunConfig:
    """Where the run lives and how it computes."""

    output_dir: str = "runs/unigen"
    """The run folder: resolved config, checkpoints, logs, the trained model."""
    seed: int = 0
    """Seeds model initialisation (same on every rank) and the per-rank random sources
    (dropout, hard-negative sampling). The data order has its own seed where the recipe has
    one (pre-training's ``data.seed``)."""
    device: Literal["auto", "cuda", "cpu"] = "auto"
    """"auto": the local GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """Autocast dtype: "auto" is bf16 on GPUs (mixed precision, §4.2) and fp32 on CPUs."""
    compile: bool = False
    """``torch.compile`` the model before wrapping it for data parallelism."""
    cpu_threads: int = 0
    """Intra-op threads of a run on the CPU (``torch.set_num_threads``); 0 keeps torch's
    default (``OMP_NUM_THREADS``, else one per core; torchrun sets 1 per process). A tiny
    model's ops are too small to gain from threads, and on a loaded machine OpenMP's
    spin-waiting workers make each one many times slower: ``configs/tiny.yaml`` takes 1."""
    validate_batches: int = 2
    """Check every batch's layout (``UniGenBatch.validate``, a few host syncs) for the first
    this-many steps; batches from the pipeline keep their layout after that."""
    save_final_model: bool = True
    """Write the trained model (``UniGen.from_pretrained``-loadable) when the run completes:
    pre-training's ``<output_dir>/final_model``, fine-tuning's ``<output_dir>/model``."""
    stop_at_step: int = 0
    """Stop after this optimizer step (checkpoint, exit 0) without changing the schedule,
    e.g. to fit a job's time slot; the next launch resumes. 0: run to the end."""

    def __post_init__(self):
        check_choices(self, "run")
        if not isinstance(self.output_dir, str) or not self.output_dir.strip():
            raise ValueError("run.output_dir must be a non-empty path")
        check_int("run", "stop_at_step", self.stop_at_step, low=0)
        check_int("run", "seed", self.seed, low=0)
        check_int("run", "validate_batches", self.validate_batches, low=0)
        check_int("run", "cpu_threads", self.cpu_threads, low=0)


@dataclass(kw_only=True)
class CheckpointConfig:
    """Checkpoints: a folder ``<output_dir>/checkpoints/step_<N>`` written to a temporary name
    and renamed when complete, so a crash never leaves a half-written checkpoint behind."""

    every: int = 1000
    """Save every this-many optimizer steps (0: only at the end, at epoch ends, and on
    SIGINT/SIGTERM)."""
    keep_last: int = 3
    """Keep the newest this-many checkpoints, delete older ones (0 keeps all)."""
    resume: str = "auto"
    """"auto": continue from the newest checkpoint in the run folder when there is one;
    "never": start fresh (refused if the run folder holds checkpoints); or a checkpoint path."""
    save_on_exit: bool = True
    """Save at the end of the run and when SIGINT/SIGTERM stops it."""
    format: Literal["full", "sharded"] = "full"
    """"full": the model and optimizer state gathered on rank 0 (``model/`` is then
    ``UniGen.from_pretrained``-loadable); "sharded": every rank writes its own shards through
    ``torch.distributed.checkpoint`` (nothing gathered: FSDP2 models larger than one process's
    memory). Resuming reads either; a run's final model is always written full."""
    accept_changes: tuple[str, ...] = ()
    """Keys (``schedule.steps``) or whole sections (``optim``) whose values may differ from the
    checkpoint's when this launch resumes it. A resume whose config differs from the
    checkpoint's in anything that changes the run stops and names the keys; listing them here
    resumes with the new values (the learning-rate schedule then follows the new schedule
    from the checkpoint's step)."""

    def __post_init__(self):
        check_choices(self, "checkpoint")
        check_int("checkpoint", "every", self.every, low=0)
        check_int("checkpoint", "keep_last", self.keep_last, low=0)
        if not isinstance(self.resume, str) or not self.resume.strip():
            raise ValueError("checkpoint.resume must be 'auto', 'never' or a checkpoint path")
        self.accept_changes = tuple(self.accept_changes)
        for key in self.accept_changes:
            if not isinstance(key, str) or not key or any(not p for p in key.split(".")):
                raise ValueError(f"checkpoint.accept_changes holds config keys such as "
                                 f"schedule.steps, got {key!r}")


@dataclass(kw_only=True)
class LoggingConfig:
    """Rank 0 logs; every ``every`` steps (and at each epoch's end) it writes the loss, the
    learning rate, samples/s, peak memory and what the recipe adds (pre-training: each task's
    loss, L_CL, τ, tokens/s, MFU)."""

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
        check_int("logging", "every", self.every)


@dataclass(kw_only=True)
class DistributedConfig:
    """Data parallelism over the processes torchrun starts (``RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``)."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend: "auto" is NCCL on GPUs and gloo on CPUs."""
    parallelism: Literal["ddp", "fsdp"] = "ddp"
    """"ddp": DistributedDataParallel (the default; the paper's model fits every GPU);
    "fsdp": FSDP2 ``fully_shard`` per decoder/encoder block then the root, for larger decoders."""
    find_unused_parameters: bool | Literal["auto"] = "auto"
    """DDP: search every step's graph for parameters without a gradient (a mixed batch may
    lack a task: no image, and the Q-Former gets no gradient). "auto" asks the recipe: off
    when every micro-batch is known to use every trainable parameter (pre-training with
    ``data.mixing: interleave`` and a [match] sample in every batch), on otherwise."""
    bucket_cap_mb: int = 25
    """DDP gradient bucket size (MiB)."""
    fsdp_reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after the forward (saves memory, costs a gather)."""
    timeout_minutes: int = 30
    """Collective timeout of the process group."""

    def __post_init__(self):
        check_choices(self, "distributed")
        if self.find_unused_parameters not in (True, False, "auto"):
            raise ValueError(f"distributed.find_unused_parameters must be true, false or "
                             f"'auto', got {self.find_unused_parameters!r}")
        check_int("distributed", "bucket_cap_mb", self.bucket_cap_mb)
        check_int("distributed", "timeout_minutes", self.timeout_minutes)
