"""UniGen's data: the four task sources, images through DALI or PIL, tokenisation, task
mixing, and a synthetic multilingual world for demos and tests.

* :class:`WikiMatrixStream` — ``WikiMatrix.<l1>-<l2>.tsv[.gz]`` → ``trans``
* :class:`CCLMTextPairStream` — JSON lines ``{source_text, target_text}`` → ``trans``
* :class:`WebdatasetImageTextStream` — img2dataset tar shards (CC3M) → ``cap``
* :class:`MultilingualCaptionStream` — CC6L JSON lines + image shards → ``match``
* :class:`QAStream` — CCQA JSON lines + image shards → ``qus``

Every source is sharded by rank and DataLoader worker, reproducible from a seed, resumable
(``state_dict``/``load_state_dict``), raises :class:`DataFormatError` (file and line) on a
malformed file and skips, counts and logs a corrupt sample. See ``docs/data.md``.
"""

from .collate import collate_task_batch, decode_batch_images, pack_token_ids
from .config import DataConfig
from .errors import CorruptSampleError, DataFormatError, FilteredSampleError, SkipStats
from .image_pipeline import (
                             CLIP_MEAN,
                             CLIP_STD,
                             DaliImageDecoder,
                             DaliWebdatasetLoader,
                             ImageSpec,
                             PilImageDecoder,
                             PilImageTransform,
                             dali_available,
                             make_image_decoder,
)
from .mixing import DataPosition, MixedTaskDataset, TaskMixer
from .multilingual_captions import MultilingualCaptionStream
from .qa import QAStream
from .sharding import ShardSpec, resolve_shard
from .stream import RecordStream, take
from .text_pairs import CCLMTextPairStream, WikiMatrixStream
from .webdataset_images import (
                             ImageStore,
                             WebdatasetImageTextStream,
                             ensure_wds_indices,
                             read_wds_index,
                             write_wds_index,
)

__all__ = [
    "CCLMTextPairStream", "CLIP_MEAN", "CLIP_STD", "CorruptSampleError", "DaliImageDecoder",
    "DataPosition",
    "DaliWebdatasetLoader", "DataConfig", "DataFormatError", "FilteredSampleError",
    "ImageSpec", "ImageStore", "MixedTaskDataset", "MultilingualCaptionStream",
    "PilImageDecoder", "PilImageTransform", "QAStream", "RecordStream", "ShardSpec",
    "SkipStats", "TaskMixer", "WebdatasetImageTextStream", "WikiMatrixStream",
    "collate_task_batch", "dali_available", "decode_batch_images", "ensure_wds_indices",
    "make_image_decoder", "pack_token_ids", "read_wds_index", "resolve_shard", "take",
    "write_wds_index", "WorldFiles", "write_synthetic_world",
]

# The synthetic world is imported on first use, not here: ``python -m unigen.data.synthetic_world``
# runs that module as __main__, and runpy warns when the package import has already loaded it
# under its own name (two copies of one module).
_LAZY = {"WorldFiles": "synthetic_world", "write_synthetic_world": "synthetic_world"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
