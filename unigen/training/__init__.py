"""The pre-training loop's parts: config, batching glue, schedule, checkpoints, metrics,
distributed setup. The entry point is :mod:`unigen.train` (``python -m unigen.train``)."""

from .config import (CheckpointConfig, DistributedConfig, InitConfig, LoggingConfig,
                     OptimConfig, RunConfig, ScheduleConfig, TrainConfig)
from .schedule import build_scheduler, lr_multiplier

__all__ = ["TrainConfig", "InitConfig", "OptimConfig", "ScheduleConfig", "RunConfig",
           "CheckpointConfig", "LoggingConfig", "DistributedConfig", "lr_multiplier",
           "build_scheduler"]
