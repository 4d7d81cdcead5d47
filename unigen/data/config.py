"""The data section of a training config (a ``@dataclass(kw_only=True)``, see
:mod:`unigen.configuration` for YAML files and ``--data.key=value`` overrides)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .mixing import validate_ratios


@dataclass(kw_only=True)
class DataConfig:
    wikimatrix: tuple[str, ...] = ()
    """WikiMatrix ``.tsv[.gz]`` files, directories or globs (translation task)."""
    cclm_text_pairs: tuple[str, ...] = ()
    """CCLM-style ``{source_text, target_text}`` JSON lines (translation task)."""
    image_shards: tuple[str, ...] = ()
    """img2dataset webdataset shards of English image–text pairs (CC3M; captioning)."""
    cc6l: tuple[str, ...] = ()
    """CC6L multilingual caption JSON lines (matching/contrastive); empty: CC3M pairs instead."""
    ccqa: tuple[str, ...] = ()
    """CCQA question-answer JSON lines keyed by image key (question answering)."""
    ratios: dict[str, float] = field(
        default_factory=lambda: {"trans": 1.0, "cap": 1.0, "qus": 1.0, "match": 1.0})
    """Relative share of each task's samples in a batch (0 switches a task off)."""
    mixing: Literal["random", "interleave"] = "random"
    """Task draws: i.i.d. by ratio, or deterministic smooth weighted round-robin."""
    min_score: float | None = 1.04
    """Drop WikiMatrix rows with a lower margin score (None keeps all)."""
    multilingual_fraction: float = 0.1
    """Share of CC6L images used with a random non-English caption (paper §4.1: 10%)."""
    image_languages: tuple[str, ...] | None = None
    """Non-English CC6L languages that may be drawn (None: all present)."""
    cc6l_captions: Literal["sampled", "all"] = "sampled"
    """How CC6L's captions are used. "sampled" (paper §4.1): ``multilingual_fraction`` of the
    images with one random non-English caption, the rest with their English one. "all" (Table
    2's "100% CC6L"): every image once per caption language — English and each of
    ``image_languages`` (None: CC6L's cs, de, fr, ja, zh) — as separate image-text pairs
    (captions of one image stay positives of each other)."""
    image_backend: Literal["auto", "dali", "pil"] = "auto"
    """Image decoding: DALI (GPU decode when CUDA is there), PIL, or DALI when installed."""
    image_size: int | None = None
    """Side of the square model input; None: the model's (``model.vision.image_size``; paper
    §4.2: 224)."""
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    """Resize filter: bicubic, CLIP's, the rule of evaluation too (``preprocess_images``, IGLUE's
    images). DALI's and PIL's cubic kernels differ by up to 8/255 at sharp edges; bilinear keeps
    them within 1/255."""
    random_resized_crop: tuple[float, float] | None = None
    """BLIP-2's pre-training augmentation: crop a random (low, high) fraction of each image's
    area (BLIP-2: 0.5, 1.0; aspect 3/4-4/3) before the resize; None resizes whole images. No
    flip (captions say left and right). The crops are drawn per process and loader worker from
    ``seed`` and the rank, and are not part of a checkpoint: a resumed run draws other crops."""
    image_features: str = ""
    """A feature store (``python -m unigen.data.prepare image-features``): the frozen ViT's
    output for every image of ``image_shards``, read instead of decoding the images and running
    the ViT (frozen ViT, many epochs; docs/training.md). Empty: decode the images."""
    encoder_tokenizer: str = ""
    """Local directory of the XLM-R-style encoder tokenizer."""
    decoder_tokenizer: str = ""
    """Local directory of the GPT-2-style decoder tokenizer."""
    max_encoder_len: int | None = None
    """Encoder tokens per text, ``<s>``/``</s>`` included; None: the model's
    (``model.text.max_length``; paper: 40)."""
    max_target_len: int = 64
    """Decoder target tokens, end-of-text included."""
    batch_size: int = 64
    """Samples per batch per rank (all tasks together)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle: bool = True
    """Shuffle file order per epoch and samples through a buffer."""
    shuffle_buffer: int = 1000
    """Samples held by each stream's shuffle buffer."""
    seed: int = 0
    """Seeds shuffling, task draws and the CC6L language choice."""
    strict: bool = True
    """Malformed files raise (True) or their bad lines are skipped and counted (False)."""
    max_dropped_fraction: float = 0.05
    """Stop the run when more than this fraction of the image samples a process has drawn
    (checked from its 100th) were dropped because their image does not decode; each dropped
    image is reported once with its shard and key. A batch left with no sample always stops
    the run."""

    def __post_init__(self):
        self.ratios = validate_ratios(self.ratios)
        if self.random_resized_crop is not None:
            lo, hi = (float(x) for x in self.random_resized_crop)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"random_resized_crop must be (low, high) with 0 < low <= high "
                                 f"<= 1, got {self.random_resized_crop!r}")
            self.random_resized_crop = (lo, hi)
        if not 0.0 <= self.max_dropped_fraction <= 1.0:
            raise ValueError(f"max_dropped_fraction must be in [0, 1], got "
                             f"{self.max_dropped_fraction}")
        if not 0.0 <= self.multilingual_fraction <= 1.0:
            raise ValueError(f"multilingual_fraction must be in [0, 1], got "
                             f"{self.multilingual_fraction}")
        for name in ("image_size", "batch_size", "max_encoder_len", "max_target_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.image_features and self.image_backend == "dali":
            raise ValueError("data.image_features and data.image_backend=dali exclude each "
                             "other: a feature-store run decodes no image (leave image_backend "
                             "auto)")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError("num_workers and shuffle_buffer must be >= 0")
        needs = {"trans": bool(self.wikimatrix or self.cclm_text_pairs),
                 "cap": bool(self.image_shards), "qus": bool(self.ccqa and self.image_shards),
                 "match": bool(self.image_shards)}
        # only checked once some data is configured, so a bare DataConfig() is a valid default
        if any((self.wikimatrix, self.cclm_text_pairs, self.image_shards, self.cc6l, self.ccqa)):
            missing = [t for t in self.ratios if not needs[t]]
            if missing:
                raise ValueError(f"tasks {missing} have a positive ratio but no data: trans "
                                 f"needs wikimatrix/cclm_text_pairs, cap and match need "
                                 f"image_shards, qus needs ccqa and image_shards")
