"""UniGen pre-training: its config (:class:`PretrainConfig`) and its recipe on the training
core (:class:`PretrainRecipe`). The entry point is ``python -m unigen.train``."""

from .config import InitConfig, PretrainConfig, SyntheticConfig
from .recipe import HISTORY_KEYS, PretrainRecipe, pretrain

__all__ = ["HISTORY_KEYS", "InitConfig", "PretrainConfig", "PretrainRecipe", "SyntheticConfig",
           "pretrain"]
