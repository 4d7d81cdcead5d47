"""What a task plugs into the training core.

The core (:class:`~unigen.training.trainer.Trainer`) owns what every task needs: processes and
devices, seeding, data-parallel wrapping, AdamW over the trainable parameters, the schedule,
autocast, gradient accumulation and clipping, checkpoints with the random states and the data
position, resume, ``run.stop_at_step``, SIGINT/SIGTERM, the stop on a non-finite loss, and
rank-0 logging (console, JSON lines, TensorBoard, progress bar). A :class:`Recipe` says what is
particular to its task: the model, the data, what a micro-batch computes, what to log beside the
loss, what to evaluate at an epoch's end and what to write when the run completes.

Pre-training (:mod:`unigen.pretraining`) and IGLUE fine-tuning (:mod:`unigen.iglue.finetune`)
are the two recipes; a new task is a third one, not a third loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StepOutput:
    """What a recipe's :meth:`Recipe.forward` returns for one micro-batch."""

    loss: torch.Tensor
    """The objective to minimise (0-d; the core averages it over the step's micro-batches)."""
    num_samples: int
    """Examples the micro-batch held (for samples/s)."""
    stats: torch.Tensor | None = None
    """``[len(Recipe.stat_names)]`` float64 values on the device, summed over the step's
    micro-batches and, once per log interval, over the processes (no host sync per step)."""


class Recipe:
    """A task on the training core. Subclasses implement the methods that raise
    ``NotImplementedError``; the others have defaults for recipes that need nothing there.

    The core calls, in order: :meth:`setup`, :meth:`build_model`, :meth:`micro_batches_per_epoch`,
    on resume :meth:`check_resume`, :meth:`load_state_dict` and :meth:`load_rank_state`, then
    :meth:`batches` and, per micro-batch, :meth:`forward`; :meth:`end_of_epoch` after an
    epoch's last step, :meth:`finish` when the run completes.
    """

    name: str = "unigen"
    """Prefix of the core's event lines (``[name] checkpoint saved: ...``)."""
    resume_hint: str = "the next launch resumes from it"
    """How a user continues a run stopped by ``run.stop_at_step`` or a signal."""
    stat_names: tuple[str, ...] = ()
    """Columns of :attr:`StepOutput.stats`."""
    data_errors: tuple[type[BaseException], ...] = ()
    """Exceptions that mean bad input data (raised by :meth:`batches`' iterator mid-run): the
    core checkpoints the steps done before letting one propagate."""
    loss_columns: tuple[str, ...] = ()
    """History columns (of :meth:`history_row`) that are losses: the end-of-run summary gives
    their final values and the loss-curve picture draws them beside the objective."""
    resume_fixed_keys: tuple[str, ...] = ()
    """Config keys or sections a resume can never change, not even with
    ``checkpoint.accept_changes`` (the checkpoint's weights and data position belong to them);
    every other key that changes the run may be accepted (:mod:`unigen.training.resume`)."""

    # ---- set-up ---------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        """Called first, with the :class:`~unigen.training.trainer.Trainer` (its ``env``,
        ``device``, ``amp_dtype`` and ``log`` are set; the model is not built yet)."""
        self.trainer = trainer
        self.env = trainer.env

    def build_model(self) -> torch.nn.Module:
        """The model on the CPU (the core moves it), built after ``torch.manual_seed(run.seed)``
        so every process starts from the same weights."""
        raise NotImplementedError

    def describe(self) -> list[str]:
        """Lines of the start banner beside the core's (run length, schedule, device, run
        folder): what the recipe trains and on what, e.g. the model's size and the data."""
        return []

    def micro_batch_size(self) -> int | None:
        """Examples per micro-batch and process, for the banner's sample count (None: not
        known in advance)."""
        return None

    def every_parameter_used(self) -> bool:
        """True when every micro-batch of every process gives every trainable parameter a
        gradient, so that DDP may skip its search for unused ones
        (``distributed.find_unused_parameters: auto``); False, the safe answer, when unsure."""
        return False

    def new_run_hint(self, checkpoint: str) -> str:
        """How to start a new run from ``checkpoint``'s weights, for when it cannot be resumed
        (another number of processes, a fixed key changed): e.g. the flag that names its
        model."""
        return ""

    def micro_batches_per_epoch(self) -> int | None:
        """Micro-batches (per process) of one pass over finite data, or None for endless
        streams. With a number, ``schedule.epochs`` sets the run's length and
        :meth:`end_of_epoch` is called."""
        return None

    def batches(self, epoch: int, done: int) -> Iterator[Any]:
        """The micro-batches this process trains on, from micro-batch ``done`` of epoch
        ``epoch`` (1-based; always (1, 0) for endless data, which resumes through
        :meth:`load_rank_state` instead). Create any DataLoader iterator before returning: the
        core restores the random states after this call, and creating one draws from them."""
        raise NotImplementedError

    # ---- a step ----------------------------------------------------------------------------
    def forward(self, model: torch.nn.Module, batch: Any, generator: torch.Generator,
                validate: bool) -> StepOutput:
        """The objective on one micro-batch. ``model`` is the wrapped model (DDP/FSDP/compiled);
        the core runs this under autocast and calls backward. ``validate``: check the batch
        (true for the first ``run.validate_batches`` steps)."""
        raise NotImplementedError

    # ---- logging ---------------------------------------------------------------------------
    def history_row(self, stats: list[float], world_size: int) -> dict[str, Any]:
        """What the per-step history keeps beside step, loss, lr and grad_norm, from one step's
        reduced stats (summed over the processes)."""
        return {}

    def interval_metrics(self, stats: list[float], steps: int, seconds: float,
                         history: dict[str, list]) -> dict[str, Any]:
        """Log-line metrics beside the core's, from the stats summed over a log interval of
        ``steps`` steps that took ``seconds``."""
        return {}

    # ---- hooks -----------------------------------------------------------------------------
    def end_of_epoch(self, trainer, epoch: int) -> dict | None:
        """Called on every process after an epoch's last step (and before its checkpoint):
        e.g. dev scoring and best-epoch selection. A returned dict is written to the JSON-lines
        log (and its numbers to TensorBoard) by rank 0."""
        return None

    def finish(self, trainer) -> str | None:
        """Called on every process when the run completes; returns the directory of the model
        it wrote, if any."""
        return None

    def check_resume(self, saved_config: dict) -> None:
        """Raise when the checkpoint's resolved config (a plain dict) cannot continue into this
        run (e.g. other data or batch size: the batches would differ)."""

    def state_dict(self) -> dict:
        """Recipe state the checkpoint keeps (rank 0's), e.g. the best dev score so far."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def rank_state(self) -> dict:
        """This process's state the checkpoint keeps, e.g. its data position."""
        return {}

    def load_rank_state(self, state: dict) -> None:
        pass
