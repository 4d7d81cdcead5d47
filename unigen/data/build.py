"""From a :class:`~unigen.data.config.DataConfig` to the task streams and the mixed dataset."""

from __future__ import annotations

import functools

from .collate import collate_task_batch
from .config import DataConfig
from .feature_store import (
    FeatureStore,
    StoredFeatureDecoder,
    StoredImageRefs,
    shard_unit_name,
)
from .image_pipeline import ImageSpec, PilImageDecoder, dali_available
from .mixing import MixedTaskDataset, TaskMixer
from .multilingual_captions import CC6L_TRANSLATIONS, MultilingualCaptionStream
from .qa import QAStream
from .sharding import ShardSpec
from .task_tokenizer import TaskTokenizer
from .text_pairs import CCLMTextPairStream, WikiMatrixStream
from .webdataset_images import ImageStore, WebdatasetImageTextStream, tar_shards

# distinct per-task seed offsets: the shuffles of the task streams are independent
_SEED_OFFSET = {"trans": 101, "cap": 202, "qus": 303, "match": 404}


def build_task_streams(cfg: DataConfig, shard: ShardSpec, *,
                       image_ref: StoredImageRefs | None = None) -> dict[str, object]:
    """Endless, sharded streams for the tasks with a positive ratio; images stay encoded (with
    ``image_ref``, a feature-store run's, they are references to stored features)."""

    def common(task):
        return dict(seed=cfg.seed + _SEED_OFFSET[task], shuffle=cfg.shuffle,
                    shuffle_buffer=cfg.shuffle_buffer, epochs=None, shard=shard,
                    strict=cfg.strict, image_ref=image_ref)

    def text_only(task):
        return {k: v for k, v in common(task).items() if k != "image_ref"}

    streams: dict[str, object] = {}
    store = None
    if cfg.image_shards and ({"qus", "match"} & set(cfg.ratios)):
        store = ImageStore(list(cfg.image_shards))
    if "trans" in cfg.ratios:
        parts = {}
        if cfg.wikimatrix:
            parts["wikimatrix"] = WikiMatrixStream(list(cfg.wikimatrix), min_score=cfg.min_score,
                                                   **text_only("trans"))
        if cfg.cclm_text_pairs:
            parts["cclm"] = CCLMTextPairStream(list(cfg.cclm_text_pairs), **text_only("trans"))
        # both corpora: alternate them, resumably, through a two-way mixer
        streams["trans"] = (next(iter(parts.values())) if len(parts) == 1 else
                            TaskMixer(parts, {k: 1.0 for k in parts}, seed=cfg.seed,
                                      mode="interleave"))
    if "cap" in cfg.ratios:
        streams["cap"] = WebdatasetImageTextStream(list(cfg.image_shards), task="cap",
                                                   **common("cap"))
    if "qus" in cfg.ratios:
        streams["qus"] = QAStream(list(cfg.ccqa), images=store, **common("qus"))
    if "match" in cfg.ratios:
        if cfg.cc6l:
            streams["match"] = MultilingualCaptionStream(
                list(cfg.cc6l), images=store, multilingual_fraction=cfg.multilingual_fraction,
                languages=cfg.image_languages, task="match",
                all_languages=(("en",) + tuple(cfg.image_languages or CC6L_TRANSLATIONS)
                               if cfg.cc6l_captions == "all" else None),
                **common("match"))
        else:
            streams["match"] = WebdatasetImageTextStream(list(cfg.image_shards), task="match",
                                                         **common("match"))
    return streams


def image_spec(cfg: DataConfig, rank: int = 0) -> ImageSpec:
    """The training images' :class:`ImageSpec` (resize rule, optional crop, per-rank seed)."""
    return ImageSpec(cfg.image_size, cfg.interpolation, crop_scale=cfg.random_resized_crop,
                     seed=cfg.seed * 1_000_003 + rank)


def open_training_store(cfg: DataConfig) -> FeatureStore:
    """``data.image_features`` opened and checked against the run: the preprocessing of
    ``cfg`` (size, filter, crops) is the store's and every shard of ``data.image_shards`` is
    extracted (:class:`~unigen.data.feature_store.FeatureStoreError` naming the option
    otherwise)."""
    store = FeatureStore(cfg.image_features)
    spec = image_spec(cfg)
    store.check_preprocessing(
        image_size=cfg.image_size, interpolation=cfg.interpolation,
        random_resized_crop=cfg.random_resized_crop, mean=spec.mean, std=spec.std,
        names={"image_size": "data.image_size", "interpolation": "data.interpolation",
               "random_resized_crop": "data.random_resized_crop",
               "mean": "the image mean (CLIP's)", "std": "the image std (CLIP's)"})
    if cfg.image_shards:
        store.require_units([shard_unit_name(p) for p in tar_shards(list(cfg.image_shards))],
                            "data.image_features")
    return store


def build_mixed_dataset(cfg: DataConfig, tokenizer: TaskTokenizer, *, rank: int | None = None,
                        world_size: int | None = None,
                        feature_store: FeatureStore | None = None) -> MixedTaskDataset:
    """The training dataset: ``DataLoader(ds, batch_size=None, num_workers=cfg.num_workers)``.

    With the DALI backend the workers leave images encoded and the trainer calls
    :func:`~unigen.data.collate.decode_batch_images` with a
    :class:`~unigen.data.image_pipeline.DaliImageDecoder` in the main process; with PIL the
    workers decode. With ``data.image_features`` (``feature_store``: the store already opened
    by :func:`open_training_store`) the workers read each image's stored ViT features instead.
    """
    if cfg.image_size is None:
        raise ValueError("data.image_size is unset (a pre-training config sets it to the "
                         "model's); give the image side the pipeline resizes to")
    image_ref = None
    if cfg.image_features:
        store = feature_store if feature_store is not None else open_training_store(cfg)
        decoder = StoredFeatureDecoder(store)
        image_ref = StoredImageRefs(store.manifest.views)
    else:
        use_dali = cfg.image_backend == "dali" or (cfg.image_backend == "auto"
                                                   and dali_available())
        decoder = None if use_dali else PilImageDecoder(image_spec(cfg, rank or 0))
    collate = functools.partial(collate_task_batch, encoder_pad_id=tokenizer.encoder_pad_id,
                                decoder_pad_id=tokenizer.decoder_pad_id, image_decoder=decoder)
    return MixedTaskDataset(functools.partial(build_task_streams, cfg, image_ref=image_ref),
                            cfg.ratios,
                            batch_size=cfg.batch_size, seed=cfg.seed, mode=cfg.mixing,
                            collate=collate, transform=tokenizer, rank=rank,
                            world_size=world_size)
