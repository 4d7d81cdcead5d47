"""What a run says about itself on rank 0: a banner when it starts, a summary when it ends.

The banner comes before the first step, on a terminal or not (a job's log must say what the
job is before its first log interval): what trains, for how many steps and samples, on which
device and processes, and where its run folder, resolved config and checkpoints are. The
summary ends every launch, completed or stopped: the steps done, the wall time and samples/s of
this launch, the final losses (objective and per task, mean of the last log interval), and
where the final model — or why there is none —, ``metrics.jsonl``, TensorBoard and the
loss-curve picture are.
"""

from __future__ import annotations

import math
import os

import torch


def _mean_of_last(values: list, n: int) -> float | None:
    tail = [v for v in values[-n:] if v is not None and math.isfinite(v)]
    return sum(tail) / len(tail) if tail else None


def final_losses(history: dict[str, list], columns: tuple[str, ...], last: int) -> dict:
    """``{"objective": ..., column: ...}``: means over the last ``last`` steps (a column's
    steps without its task skipped; a column never seen is left out)."""
    out = {}
    for name, key in (("objective", "loss"), *((c, c) for c in columns)):
        value = _mean_of_last(history.get(key, []), last)
        if value is not None:
            out[name] = value
    return out


def start_lines(trainer, launch_config: str, launch: int) -> list[str]:
    """The banner's lines (the core's, then the recipe's :meth:`~Recipe.describe`)."""
    cfg, env, recipe = trainer.cfg, trainer.env, trainer.recipe
    s, o = cfg.schedule, cfg.optim
    total = trainer.total_steps
    per_process = recipe.micro_batch_size()
    length = f"{total} steps"
    if trainer.steps_per_epoch is not None:
        length += f" ({s.epochs} epochs of {trainer.steps_per_epoch})"
    if per_process:
        global_batch = per_process * env.world_size * o.grad_accum_steps
        parts = [f"{per_process} per process"] if global_batch != per_process else []
        if env.world_size > 1:
            parts.append(f"{env.world_size} processes")
        if o.grad_accum_steps > 1:
            parts.append(f"{o.grad_accum_steps} micro-batches")
        length += (f" × {global_batch} samples" + (f" ({' × '.join(parts)})" if parts else "")
                   + f" = {total * global_batch:,} samples")
    precision = "bf16 autocast" if trainer.amp_dtype is not None else "fp32"
    where = f"{trainer.device.type} ({precision}"
    if trainer.device.type == "cpu":
        where += f", {torch.get_num_threads()} thread(s) per process"
    where += ")"
    if env.world_size > 1:
        where += f", {env.world_size} processes, {cfg.distributed.parallelism.upper()}"
        if cfg.distributed.parallelism == "ddp":
            where += (", unused-parameter search " + ("on" if trainer.find_unused else "off")
                      + (" (auto)" if cfg.distributed.find_unused_parameters == "auto" else ""))
    parts = [f"lr {o.lr:g}"] + ([f"{s.warmup_steps} warm-up steps"] if s.warmup_steps else [])
    parts.append("constant" if s.decay == "constant" else f"{s.decay} decay"
                 + (f" to {s.min_lr_ratio:g}×" if s.min_lr_ratio else ""))
    schedule = ", ".join(parts)
    every = cfg.checkpoint.every
    lines = [f"{length}, on {where}; {schedule}",
             *recipe.describe(),
             f"run folder {trainer.run_dir} (launch {launch}, config {launch_config}); "
             + (f"checkpoints every {every} steps" if every else "checkpoints at the end")
             + (f", stopping at step {cfg.run.stop_at_step} (run.stop_at_step)"
                if 0 < cfg.run.stop_at_step < total else "")]
    return lines


def end_lines(trainer, *, seconds: float, samples: float, final_dir: str | None,
              stopped: str | None, curve: str | None, curve_note: str) -> list[str]:
    """The summary's lines. ``stopped``: why the run ended before its last step (None when it
    is complete); ``curve``: the loss-curve picture (None: ``curve_note`` says why)."""
    cfg, recipe = trainer.cfg, trainer.recipe
    steps_here = trainer.step - trainer.start_step
    rate = f", {samples / seconds:.1f} samples/s" if seconds > 0 and samples else ""
    if steps_here == 0 and stopped is None:
        head = f"the run was already complete at step {trainer.step}: nothing to train"
    else:
        head = (f"{'finished' if stopped is None else 'stopped'} at step {trainer.step} of "
                f"{trainer.total_steps}: {steps_here} steps in {seconds:.1f} s this launch{rate}")
    if stopped is not None:
        head += f" ({stopped})"
    lines = [head]
    last = min(cfg.logging.every, max(1, len(trainer.history.get("step", []))))
    losses = final_losses(trainer.history, recipe.loss_columns, last)
    if losses:
        lines.append(f"final losses (mean of the last {last} steps): "
                     + " | ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    if final_dir is not None:
        lines.append(f"final model: {final_dir}")
    elif stopped is not None:
        lines.append(f"final model: not written, the run is not complete ({recipe.resume_hint}"
                     + (f"; newest checkpoint {trainer.last_checkpoint}"
                        if trainer.last_checkpoint else "") + ")")
    else:
        why = ("run.save_final_model is false" if not cfg.run.save_final_model
               else f"{recipe.name} writes none")
        lines.append(f"final model: not written ({why})"
                     + (f"; the weights are in {os.path.join(trainer.last_checkpoint, 'model')}"
                        if trainer.last_checkpoint else ""))
    logs = []
    if cfg.logging.jsonl:
        logs.append(f"metrics {os.path.join(trainer.run_dir, 'metrics.jsonl')}")
    if trainer.logger is not None and trainer.logger.tensorboard_dir:
        logs.append(f"TensorBoard {trainer.logger.tensorboard_dir}")
    logs.append(f"loss curve {curve}" if curve else f"loss curve: {curve_note}")
    lines.append("; ".join(logs))
    return lines
