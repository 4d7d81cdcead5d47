"""The UniGen model (paper §3): image encoder (frozen CLIP ViT-L/14 + Q-Former), XLM-R text
encoder, GPT-2 English decoder, the five losses, loading/saving and the inference API.

Submodules are imported lazily: ``unigen.config`` imports the decoder config from
``unigen.model.gpt2_decoder`` and ``unigen.model.unigen_model`` imports ``unigen.config``, so an
eager import here would be circular.
"""

import importlib

_LAZY = {
    "UniGen": "unigen.model.unigen_model",
    "UniGenOutput": "unigen.model.unigen_model",
    "UniGenBatch": "unigen.model.batch",
    "Example": "unigen.model.batch",
    "collate_examples": "unigen.model.batch",
    "TASKS": "unigen.model.batch",
    "ImageEncoder": "unigen.model.image_encoder",
    "preprocess_images": "unigen.model.image_encoder",
    "QFormer": "unigen.model.qformer",
    "TextEncoder": "unigen.model.text_encoder",
    "remap_lavis_qformer_state_dict": "unigen.model.lavis_remap",
    "load_lavis_qformer_checkpoint": "unigen.model.lavis_remap",
    "CheckpointError": "unigen.model.checkpoint",
    "count_parameters": "unigen.model.unigen_model",
    "RetrievalResult": "unigen.model.unigen_model",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unigen.model' has no attribute {name!r}")
