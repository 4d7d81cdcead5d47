"""The training loop, once: every recipe (pre-training, IGLUE fine-tuning) runs on it.

    trainer = Trainer(recipe, config)        # config: a recipe config with the core's sections
    result = trainer.fit()                   # TrainResult

Per optimizer step: ``optim.grad_accum_steps`` micro-batches (each one batch per process) go
through the recipe's forward under autocast; their mean loss is backpropagated (DDP all-reduces
on the last micro-batch only), gradients are clipped to ``optim.grad_clip``, AdamW steps and the
schedule (a pure function of the step) sets the next learning rate. Per-step statistics stay on
the device and are all-reduced once per log interval; rank 0 logs, checkpoints
(``<output_dir>/checkpoints/step_<N>``) and prints. A run resumes exactly from its newest
checkpoint: weights, AdamW's state, the schedule, every random state of every process and the
data position. SIGINT/SIGTERM finish the step, save and return; a non-finite loss stops the run
with a FloatingPointError naming the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from unigen.configuration import ConfigError, config_to_dict, save_config

from . import checkpointing as ckpt
from .distributed import (
    DistEnv,
    all_reduce_sum,
    any_rank,
    average_gradients,
    barrier,
    clip_grad_norm,
    full_state_dicts,
    gather_objects,
    load_full_state_dicts,
    load_sharded_state,
    parallelize,
    save_sharded_state,
)
from .metrics import MetricLogger, peak_memory_gib
from .optim import autocast_dtype, build_optimizer
from .plots import LOSS_CURVE, matplotlib_available, write_loss_curve
from .recipe import Recipe, StepOutput
from .report import end_lines, start_lines
from .resume import check_resume_config
from .schedule import build_scheduler
from .signals import StopRequest

# Per-process random sources differ by rank (dropout, hard-negative sampling): seed + this × rank.
RANK_SEED_STRIDE = 1_000_003
# The core's columns of the per-step statistics; the recipe's stat_names follow.
_LOSS, _SAMPLES, _GRAD_NORM = 0, 1, 2
_CORE_COLUMNS = 3
# The run folder's record of every launch's resolved config (config.yaml is the first's).
LAUNCHES_DIR = "launches"


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns (on every rank; ``history`` is global, reduced over
    ranks)."""

    run_dir: str
    """The run folder (resolved config, checkpoints, metrics, the trained model)."""
    model: torch.nn.Module
    """The trained model (unwrapped from DDP; under FSDP still sharded), on the training device."""
    step: int
    """Optimizer steps completed (including those before a resume)."""
    history: dict[str, list]
    """Per optimizer step, from step 1 (``history["step"]``): ``loss`` (the objective, mean
    over the processes), ``lr``, ``grad_norm`` (before clipping), and the recipe's columns.
    Resumed runs carry the steps before the resume from the checkpoint."""
    last_checkpoint: str | None = None
    """Path of the newest checkpoint this run wrote (None if it wrote none)."""
    final_model_dir: str | None = None
    """The model directory the recipe wrote when the run completed (None otherwise)."""
    stopped_by_signal: str | None = None
    """"SIGINT"/"SIGTERM" when a signal stopped the run early, else None."""
    resumed_from: str | None = None
    """The checkpoint this run started from, if any."""
    config: object | None = field(default=None, repr=False)
    seconds: float = 0.0
    """Wall time of this launch's training loop."""
    samples: int = 0
    """Examples this launch trained on (every process together)."""
    loss_curve: str | None = None
    """The loss-curve picture (``<run_dir>/loss_curve.png``; None without matplotlib)."""
    launch_config: str | None = None
    """This launch's resolved config (``<run_dir>/launches/launch_<N>.yaml``)."""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    """Trains ``recipe``'s model with ``config``'s core sections (``optim``, ``schedule``,
    ``run``, ``checkpoint``, ``logging``, ``distributed``) in this process: one rank of a
    torchrun job, or alone. ``log`` receives rank 0's console lines (default: print, or the
    progress bar's write)."""

    def __init__(self, recipe: Recipe, config, env: DistEnv,
                 log: Callable[[str], None] | None = None):
        self._t_created = time.perf_counter()  # the launch's wall time counts its set-up
        self.recipe, self.cfg, self.env = recipe, config, env
        self.device = env.device
        self.run_dir = config.run.output_dir
        self.ckpt_root = ckpt.checkpoint_root(self.run_dir)
        self._log = log
        self._pbar = None
        self.amp_dtype = autocast_dtype(config.run, self.device)
        recipe.setup(self)
        # The run folder is made when training starts (_fit): an error found while setting up
        # leaves no half-made folder behind.
        self._made_run_dir = False

        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        seed_everything(config.run.seed)
        self.model = recipe.build_model().to(self.device)
        self.model.train()
        # Per-rank random sources from here on.
        rank_seed = config.run.seed + RANK_SEED_STRIDE * env.rank
        seed_everything(rank_seed)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(rank_seed + 17)

        # DDP's search for parameters without a gradient costs a graph walk per step and warns
        # on every rank when it finds none: on only where a micro-batch may leave some unused.
        find_unused = config.distributed.find_unused_parameters
        self.find_unused = (not recipe.every_parameter_used()) if find_unused == "auto" \
            else bool(find_unused)
        self.step_model, self.replicated = parallelize(
            self.model, dataclasses.replace(config.distributed,
                                            find_unused_parameters=self.find_unused), env)
        if config.run.compile:
            self.step_model = torch.compile(self.step_model)
        self.optimizer = build_optimizer(self.model, config.optim, self.device)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]

        self.micro_per_epoch = recipe.micro_batches_per_epoch()
        accum = config.optim.grad_accum_steps
        self.steps_per_epoch = (None if self.micro_per_epoch is None
                                else -(-self.micro_per_epoch // accum))
        self.total_steps = self._total_steps()
        self.scheduler = build_scheduler(
            self.optimizer, dataclasses.replace(config.schedule, steps=self.total_steps,
                                                epochs=0))
        self.step = 0
        self.start_step = 0  # the step this launch started from (a resumed checkpoint's)
        self.samples = 0.0   # examples trained on in this launch, every process together
        self.history: dict[str, list] = {"step": [], "loss": [], "lr": [], "grad_norm": []}
        self.last_checkpoint: str | None = None
        self.resumed_from: str | None = None
        self._accepted_changes: list[tuple[str, object, object]] = []  # by a resume
        self.stop = StopRequest()
        self.logger: MetricLogger | None = None
        self._pending: list[torch.Tensor] = []
        self._pending_lr: list[float] = []
        self._diverged: tuple[int, float] | None = None

    # ---- sizes -------------------------------------------------------------------------------
    def _total_steps(self) -> int:
        s = self.cfg.schedule
        if s.epochs:
            if self.steps_per_epoch is None:
                raise ConfigError(f"schedule.epochs: {self.recipe.name}'s data is endless; set "
                                  f"the run's length with schedule.steps", kind="invalid")
            total = s.epochs * self.steps_per_epoch
        else:
            total = s.steps
        if s.warmup_steps > total:
            raise ConfigError(f"schedule.warmup_steps ({s.warmup_steps}) exceeds the run's "
                              f"{total} steps", kind="invalid")
        return total

    def epoch_of(self, step: int) -> int:
        """The (1-based) epoch optimizer step ``step`` (1-based) belongs to."""
        return (step - 1) // self.steps_per_epoch + 1

    def _micro_batches(self, step: int) -> int:
        """Micro-batches of optimizer step ``step`` (0-based): grad_accum_steps, less at the
        end of an epoch whose micro-batches do not divide evenly."""
        accum = self.cfg.optim.grad_accum_steps
        if self.micro_per_epoch is None:
            return accum
        within = step % self.steps_per_epoch
        return min(accum, self.micro_per_epoch - within * accum)

    # ---- output on rank 0 (through tqdm so the bar is not torn) ------------------------------
    def write(self, line: str) -> None:
        if not self.env.is_main:
            return
        if self._log is not None:
            self._log(line)
        elif self._pbar is not None:
            self._pbar.write(line)
        else:
            print(line, flush=True)

    def log(self, text: str) -> None:
        """An event line on rank 0, prefixed with the recipe's name (``logging.console``)."""
        if self.cfg.logging.console:
            self.write(f"[{self.recipe.name}] {text}")

    # ---- resume ------------------------------------------------------------------------------
    def _resolve_resume(self) -> str | None:
        r = self.cfg.checkpoint.resume
        if r == "never":
            if ckpt.list_checkpoints(self.ckpt_root):
                raise ConfigError(f"checkpoint.resume is 'never' but {self.ckpt_root} already "
                                  f"holds checkpoints; use another run.output_dir or resume",
                                  kind="invalid")
            return None
        if r == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        if not os.path.isdir(r):
            raise ConfigError(f"checkpoint.resume: {r!r} is not a checkpoint directory",
                              kind="invalid")
        return r

    def _resume(self, path: str) -> dict:
        # whether it can be resumed is decided from its trainer state, before any weight is read
        trainer = ckpt.read_trainer_state(path)
        saved_world = len(trainer["ranks"])
        hint = self.recipe.new_run_hint(path)
        if saved_world != self.env.world_size:
            raise ConfigError(f"checkpoint {path} was written by {saved_world} processes, this "
                              f"run has {self.env.world_size}: exact resuming needs the same "
                              f"world size; relaunch with {saved_world} (torchrun "
                              f"--nproc_per_node {saved_world}), or start a new run from its "
                              f"weights in another run.output_dir"
                              + (f" ({hint})" if hint else ""), kind="invalid")
        try:
            accepted = check_resume_config(trainer["config"], self.cfg, checkpoint=path,
                                           accepted=self.cfg.checkpoint.accept_changes,
                                           fixed=self.recipe.resume_fixed_keys,
                                           new_run_hint=hint)
        except ValueError as e:
            raise ConfigError(str(e), kind="invalid") from None
        step = int(trainer["step"])
        if step > self.total_steps:
            raise ConfigError(f"checkpoint {path} is at step {step}, past this run's "
                              f"{self.total_steps} steps: set the run's length to at least "
                              f"{step} to resume it, or start a new run in another "
                              f"run.output_dir", kind="invalid")
        self.recipe.check_resume(trainer["config"])
        state = ckpt.load_checkpoint(path, self.model, trainer)
        # this launch's optimizer settings, as built from its config (lr, betas, weight decay)
        settings = [{k: v for k, v in g.items() if k != "params"}
                    for g in self.optimizer.param_groups]
        if state["sharded"] is not None:
            load_sharded_state(self.model, self.optimizer, state["sharded"])
        else:
            load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"],
                                  self.cfg.distributed, self.env)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self._apply_schedule(settings, step)
        self.step = self.start_step = step
        self.history = {k: list(v) for k, v in trainer["history"].items()}
        self.recipe.load_state_dict(trainer.get("recipe", {}))
        mine = trainer["ranks"][self.env.rank]
        self.recipe.load_rank_state(mine["data"])
        self.resumed_from = path
        self._accepted_changes = accepted
        return mine["rng"]

    def _apply_schedule(self, settings: list[dict], step: int) -> None:
        """After a resume: the optimizer takes this launch's settings back (loading the
        checkpoint's state also loads the settings it was saved with) and the learning rate of
        ``step`` under this launch's schedule. Without accepted changes both equal the
        checkpoint's, to the bit; with them (``optim.lr``, ``schedule.steps``) the run goes on
        with the new values from this step."""
        for group, mine in zip(self.optimizer.param_groups, settings):
            group.update(mine)
        self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.scheduler.lr_lambdas):
            group["lr"] = group["initial_lr"] * factor(step)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    # ---- checkpoints and the trained model ---------------------------------------------------
    def save_checkpoint(self) -> str | None:
        self._flush()  # the history saved must be complete up to this step
        self._raise_if_diverged()
        rank_state = {"rng": ckpt.capture_rng_state(self.device, self.generator),
                      "data": self.recipe.rank_state()}
        ranks = gather_objects(rank_state, self.env)
        tmp = None
        if self.cfg.checkpoint.format == "sharded":
            # every rank writes its shards into one temporary folder rank 0 prepares; rank 0
            # adds the rest and renames it (the same atomic save as a full checkpoint)
            if self.env.is_main:
                tmp = ckpt.prepare_checkpoint_dir(self.ckpt_root, self.step, tag="sharded")
            tmp = gather_objects(tmp, self.env)[0]
            save_sharded_state(self.model, self.optimizer, os.path.join(tmp, ckpt.SHARDED_DIR))
            barrier(self.env)
            model_sd = optim_sd = None
        else:
            model_sd, optim_sd = full_state_dicts(self.step_model, self.optimizer,
                                                  self.cfg.distributed, self.env)
        path = None
        if self.env.is_main:
            trainer_state = {"step": self.step, "scheduler": self.scheduler.state_dict(),
                             "history": self.history, "ranks": ranks,
                             "world_size": self.env.world_size,
                             "config": config_to_dict(self.cfg),
                             "recipe": self.recipe.state_dict()}
            m = self.model
            path = ckpt.save_checkpoint(
                self.ckpt_root, self.step, model_config=m.config, model_state=model_sd,
                optimizer_state=optim_sd, trainer_state=trainer_state,
                keep_last=self.cfg.checkpoint.keep_last, text_tokenizer=m.text_tokenizer,
                decoder_tokenizer=m.decoder_tokenizer, tmp=tmp)
            self.log(f"checkpoint saved: {path}")
        barrier(self.env)  # nobody runs ahead (or exits) while rank 0 is still writing
        self.last_checkpoint = path
        self._t_last = time.perf_counter()  # don't count the save in the throughput
        return path

    def save_model(self, path: str) -> str:
        """Write the model ``UniGen.from_pretrained``-loadable into ``path`` (rank 0 writes;
        under FSDP every rank takes part in gathering the weights). Call on every rank."""
        model_sd = None
        if self.env.is_distributed and self.cfg.distributed.parallelism == "fsdp":
            model_sd, _ = full_state_dicts(self.step_model, self.optimizer,
                                           self.cfg.distributed, self.env)
        if self.env.is_main:
            m = self.model
            ckpt.write_pretrained(path, m.config, m.state_dict() if model_sd is None else model_sd,
                                  m.text_tokenizer, m.decoder_tokenizer)
        barrier(self.env)
        return path

    # ---- one optimizer step ------------------------------------------------------------------
    def _train_step(self, it, steps_here: int) -> None:
        cfg, env = self.cfg, self.env
        n_micro = self._micro_batches(self.step)
        names = self.recipe.stat_names
        stats = torch.zeros(_CORE_COLUMNS + len(names), dtype=torch.float64, device=self.device)
        fsdp = env.is_distributed and cfg.distributed.parallelism == "fsdp"
        ddp = env.is_distributed and cfg.distributed.parallelism == "ddp"
        validate = steps_here < cfg.run.validate_batches
        for micro in range(n_micro):
            batch = next(it)
            last = micro == n_micro - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            sync = self.step_model.no_sync() if ddp and not last else contextlib.nullcontext()
            if fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out: StepOutput = self.recipe.forward(self.step_model, batch,
                                                          self.generator, validate)
                (out.loss / n_micro).backward()
            stats[_LOSS] += out.loss.detach().double() / n_micro
            stats[_SAMPLES] += out.num_samples
            if names:
                stats[_CORE_COLUMNS:] += out.stats
        average_gradients(self.replicated, env)  # FSDP: the temperature stays replicated
        gnorm = clip_grad_norm(self.params, cfg.optim.grad_clip or float("inf"))
        stats[_GRAD_NORM] = gnorm.double()
        self._pending_lr.append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._pending.append(stats)

    # ---- metrics: one all-reduce per log interval, not per step ------------------------------
    def _flush(self) -> dict | None:
        if not self._pending:
            return None
        stats = torch.stack(self._pending)
        all_reduce_sum(stats, self.env)
        rows = stats.cpu().tolist()
        w = self.env.world_size
        first = self.step - len(rows) + 1
        h = self.history
        for i, row in enumerate(rows):
            h["step"].append(first + i)
            h["loss"].append(row[_LOSS] / w)
            if self._diverged is None and not np.isfinite(h["loss"][-1]):
                self._diverged = (first + i, h["loss"][-1])
            h["lr"].append(self._pending_lr[i])
            h["grad_norm"].append(row[_GRAD_NORM] / w)
            for k, v in self.recipe.history_row(row[_CORE_COLUMNS:], w).items():
                h.setdefault(k, []).append(v)
        now = time.perf_counter()
        elapsed = max(now - self._t_last, 1e-9)
        totals = [sum(col) for col in zip(*rows)]
        self.samples += totals[_SAMPLES]
        metrics = {"loss/total": totals[_LOSS] / (w * len(rows))}
        metrics.update(self.recipe.interval_metrics(totals[_CORE_COLUMNS:], len(rows), elapsed,
                                                    h))
        metrics.update({"lr": self._pending_lr[-1], "grad_norm": h["grad_norm"][-1],
                        "samples_per_s": totals[_SAMPLES] / elapsed,
                        "peak_mem_gib": peak_memory_gib(self.device)})
        if self.steps_per_epoch is not None:
            metrics["epoch"] = self.epoch_of(self.step)
        self._pending, self._pending_lr = [], []
        self._t_last = now
        return metrics

    def _log_interval(self) -> None:
        metrics = self._flush()
        if metrics is None:
            return
        self.logger.log(self.step, metrics)
        if self._pbar is not None:
            self._pbar.set_postfix(loss=f"{metrics['loss/total']:.4f}", refresh=False)
        self._raise_if_diverged()

    def _raise_if_diverged(self) -> None:
        # Every rank holds the same reduced losses, so all ranks stop together (and no
        # checkpoint of a diverged model is written).
        if self._diverged is not None:
            s, v = self._diverged
            raise FloatingPointError(f"{self.recipe.name}: the loss is {v} at step {s}; try a "
                                     f"lower --optim.lr")

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to the run's length (or ``run.stop_at_step``, or a signal)."""
        completed = False
        threads = torch.get_num_threads()
        if self.cfg.run.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(self.cfg.run.cpu_threads)
        try:
            result = self._fit()
            completed = True
            return result
        finally:
            torch.set_num_threads(threads)
            self.stop.restore()
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            if self.logger is not None:
                self.logger.close()
            if not completed:
                self._remove_unused_run_dir()

    def _remove_unused_run_dir(self) -> None:
        """After an error before the first step completed: remove the run folder this run made
        (it holds only the config and empty logs), so a retry starts clean."""
        if (self._made_run_dir and self.env.is_main and self.step == 0
                and self.last_checkpoint is None and self.resumed_from is None):
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _save_after_data_error(self, saved_at: int) -> None:
        """A recipe's data error mid-run (a malformed line, a truncated shard): keep the steps
        done in a checkpoint before the error propagates. With several processes the others
        are inside the step's collectives, so no checkpoint can be written together; the last
        periodic one stands (torchrun stops the other processes when this one exits)."""
        if self.step == 0 or saved_at == self.step:
            return
        if self.env.is_distributed:
            self.write(f"[{self.recipe.name}] data error at step {self.step + 1} on rank "
                       f"{self.env.rank}; the newest checkpoint is the last periodic one")
            return
        self.optimizer.zero_grad(set_to_none=True)  # the failed step's partial gradients
        path = self.save_checkpoint()
        self.log(f"data error at step {self.step + 1}: the {self.step} steps done are saved in "
                 f"{path}; fix the data, then {self.recipe.resume_hint}")

    def _save_launch_config(self) -> tuple[str, int]:
        """Keep this launch's resolved config: ``launches/launch_<N>.yaml`` for every launch,
        and ``config.yaml`` for the run's first (never overwritten: a relaunch that accepted
        changes, or a bad one, leaves the earlier launches' configs as they were). Rank 0."""
        folder = os.path.join(self.run_dir, LAUNCHES_DIR)
        os.makedirs(folder, exist_ok=True)
        launch = 1 + sum(1 for f in os.listdir(folder) if f.startswith("launch_"))
        path = save_config(self.cfg, os.path.join(folder, f"launch_{launch:03d}.yaml"))
        first = os.path.join(self.run_dir, "config.yaml")
        if not os.path.exists(first):
            save_config(self.cfg, first)
        return path, launch

    def _fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        resume_path = self._resolve_resume()
        rng_state = self._resume(resume_path) if resume_path else None
        launch_config, launch = None, 0
        if env.is_main:
            self._made_run_dir = not os.path.isdir(self.run_dir)
            os.makedirs(self.run_dir, exist_ok=True)
            launch_config, launch = self._save_launch_config()
        barrier(env)
        self.logger = MetricLogger(self.run_dir, cfg.logging, enabled=env.is_main,
                                   write=self.write, name=self.recipe.name,
                                   resume_step=self.step if resume_path else None)
        if env.is_main:
            for line in start_lines(self, launch_config, launch):
                self.log(line)
            for key, old, new in self._accepted_changes:
                self.log(f"resuming with {key} {old!r} → {new!r} (checkpoint.accept_changes)")
        if self.steps_per_epoch is None:
            epoch, done = 1, 0
        else:
            epoch = self.step // self.steps_per_epoch + 1
            done = (self.step % self.steps_per_epoch) * cfg.optim.grad_accum_steps
        it = self.recipe.batches(epoch, done)
        # Creating a loader iterator draws from the global RNG; restoring after it makes the
        # resumed run's random state equal the uninterrupted run's at this step.
        if rng_state is not None:
            ckpt.restore_rng_state(rng_state, self.device, self.generator)
            where = "" if self.steps_per_epoch is None else (
                f" (epoch {epoch}, {self.step % self.steps_per_epoch} of {self.steps_per_epoch} "
                f"steps done)")
            self.log(f"resumed from {resume_path} at step {self.step}{where}")
        total = self.total_steps
        if cfg.run.stop_at_step:
            total = min(total, cfg.run.stop_at_step)
        # The bar only on a terminal: written to a file, its carriage returns tear the lines.
        if env.is_main and cfg.logging.progress_bar and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
                self._pbar = tqdm(total=total, initial=self.step, desc=self.recipe.name,
                                  dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._pbar = None
        self.stop.install()
        saved_at = self.step if resume_path else -1
        steps_here = 0
        self._t_last = t_loop = time.perf_counter()
        while self.step < total:
            try:
                self._train_step(it, steps_here)
            except self.recipe.data_errors:
                self._save_after_data_error(saved_at)
                raise
            steps_here += 1
            if self._pbar is not None:
                self._pbar.update(1)
            epoch_end = self.steps_per_epoch is not None and self.step % self.steps_per_epoch == 0
            if self.step % cfg.logging.every == 0 or self.step == total or epoch_end:
                self._log_interval()
            if epoch_end:
                report = self.recipe.end_of_epoch(self, self.epoch_of(self.step))
                if report:
                    self.logger.record(self.step, report)
            if epoch_end or (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
                self.save_checkpoint()
                saved_at = self.step
            if any_rank(self.stop.signum is not None, env):
                break
        self._log_interval()
        seconds = time.perf_counter() - t_loop
        if cfg.checkpoint.save_on_exit and saved_at != self.step:
            self.save_checkpoint()
        stopped, why = None, None
        if self.step < self.total_steps:
            if self.step < total:
                stopped = self.stop.name or "a signal on another rank"
                why = f"stopped by {stopped}"
                self.log(f"stopped by {stopped} at step {self.step}; {self.recipe.resume_hint}")
            else:
                why = "run.stop_at_step"
                self.log(f"stopped at step {self.step} (run.stop_at_step); "
                         f"{self.recipe.resume_hint}")
        final_dir = self.recipe.finish(self) if self.step == self.total_steps else None
        curve = None
        if env.is_main:
            curve = self._report_end(seconds, final_dir, why,
                                     time.perf_counter() - self._t_created)
        return TrainResult(run_dir=self.run_dir, model=self.model, step=self.step,
                           history=self.history, last_checkpoint=self.last_checkpoint,
                           final_model_dir=final_dir, stopped_by_signal=stopped,
                           resumed_from=self.resumed_from, config=cfg, seconds=seconds,
                           samples=int(self.samples), loss_curve=curve,
                           launch_config=launch_config)

    def _report_end(self, seconds: float, final_dir: str | None, stopped: str | None,
                    wall: float) -> str | None:
        """The loss-curve picture and the summary lines (rank 0); returns the picture's path."""
        curve, note = None, ("not drawn, no step yet" if matplotlib_available() else
                             "matplotlib is not installed (pip install matplotlib)")
        try:
            curve = write_loss_curve(self.history, self.recipe.loss_columns,
                                     os.path.join(self.run_dir, LOSS_CURVE),
                                     title=f"{self.recipe.name}: {self.run_dir}")
        except Exception as e:  # a picture must never cost the run its summary
            note = f"not drawn ({type(e).__name__}: {e})"
        for line in end_lines(self, seconds=seconds, samples=self.samples, final_dir=final_dir,
                              stopped=stopped, curve=curve, curve_note=note):
            self.log(line)
        self.log(f"launch wall time {wall:.1f} s (set-up, training, checkpoints, final model)")
        return curve
