"""The UniGen model (paper §3): image encoder (frozen CLIP ViT-L/14 + Q-Former), XLM-R text
encoder, GPT-2 English decoder, the five losses, loading/saving and the inference API.

Submodules load on first use, so ``import unigen.model`` (and reading a config from
``unigen.model.config``) does not build the whole model stack.
"""

import importlib

_LAZY = {
    "UniGen": "unigen.model.unigen_model",
    "UniGenConfig": "unigen.model.config",
    "TASK_NAMES": "unigen.model.config",
    "UniGenOutput": "unigen.model.unigen_model",
    "UniGenBatch": "unigen.model.batch",
    "TASK_IDS": "unigen.model.config",
    "ImageEncoder": "unigen.model.image_encoder",
    "preprocess_images": "unigen.model.image_encoder",
    "QFormer": "unigen.model.qformer",
    "TextEncoder": "unigen.model.text_encoder",
    "remap_lavis_qformer_state_dict": "unigen.model.lavis_remap",
    "load_lavis_qformer_checkpoint": "unigen.model.lavis_remap",
    "CheckpointError": "unigen.model.pretrained",
    "count_parameters": "unigen.model.unigen_model",
    "RetrievalResult": "unigen.model.unigen_model",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unigen.model' has no attribute {name!r}")
