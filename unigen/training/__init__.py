"""The training core: one loop (:class:`Trainer`) that every recipe runs on, its config
sections, the :class:`Recipe` interface, and the parts the loop is made of (optimizer,
schedule, checkpoints, metrics, distributed set-up, signals). See :mod:`unigen.training.recipe`
for what a recipe plugs in."""

from .config import CheckpointConfig, DistributedConfig, LoggingConfig, OptimConfig, RunConfig, ScheduleConfig
from .optim import trainable_param_groups
from .recipe import Recipe, StepOutput
from .schedule import build_scheduler, lr_multiplier
from .trainer import Trainer, TrainResult

__all__ = ["CheckpointConfig", "DistributedConfig", "LoggingConfig", "OptimConfig", "Recipe",
           "RunConfig", "ScheduleConfig", "StepOutput", "TrainResult", "Trainer",
           "build_scheduler", "lr_multiplier", "trainable_param_groups"]
