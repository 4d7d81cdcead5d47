"""The pre-training config (``python -m unigen.train``): the model, where its weights start,
the data pipeline, and the training core's sections (:mod:`unigen.training.config`).

Sections::

    model        UniGenConfig        the network (unigen.model.config)
    init         InitConfig          where pre-trained weights come from
    data         DataConfig          the data pipeline (unigen.data.config)
    synthetic    SyntheticConfig     the synthetic world as the data (configs/tiny.yaml)
    optim, schedule, run, checkpoint, logging, distributed   the training core's
"""

from __future__ import annotations

from dataclasses import dataclass, field

from unigen.configuration import check_int
from unigen.data.config import DataConfig
from unigen.model.config import UniGenConfig
from unigen.training.config import (
    CheckpointConfig,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)


@dataclass(kw_only=True)
class InitConfig:
    """Initial weights. All empty: random initialisation (tests, the demo). The paper starts
    from pre-trained CLIP ViT-L/14, BLIP-2's Q-Former, xlm-roberta-base and gpt2 (§3.1)."""

    from_pretrained: str = ""
    """A directory written by ``UniGen.save_pretrained``; its config.json replaces ``model``."""
    clip_dir: str = ""
    """Local Hugging Face CLIP ViT-L/14 directory (``UniGen.from_pretrained_parts``)."""
    xlmr_dir: str = ""
    """Local Hugging Face xlm-roberta-base directory."""
    gpt2_dir: str = ""
    """Local Hugging Face gpt2 directory."""
    qformer_checkpoint: str = ""
    """LAVIS BLIP-2 (ViT-L) checkpoint file holding the Q-Former."""

    def __post_init__(self):
        if self.from_pretrained and self.uses_parts:
            raise ValueError("init.from_pretrained and the pre-trained parts (init.clip_dir, "
                             "xlmr_dir, gpt2_dir, qformer_checkpoint) exclude each other")

    @property
    def uses_parts(self) -> bool:
        return any((self.clip_dir, self.xlmr_dir, self.gpt2_dir, self.qformer_checkpoint))


@dataclass(kw_only=True)
class SyntheticConfig:
    """The synthetic multilingual world (``unigen.data.synthetic_world``) as the run's data,
    with tiny tokenizers trained on its text: written into ``dir`` by the first launch that
    names it, reused by every later one with the same settings. It fills ``data``'s sources
    and tokenizer folders (any already set must be the world's) and sets the model's two
    vocabulary sizes to its tokenizers'; its images are ``data.image_size`` pixels."""

    dir: str = ""
    """The folder of the world and its tokenizers ("": no synthetic world)."""
    num_images: int = 2000
    """Training images (each with a caption, a CC6L line and a QA pair)."""
    num_text_pairs: int = 1000
    """Translation pairs per non-English language."""
    num_eval_images: int = 200
    """Held-out images (python -m unigen.scoring.world scores a model on them)."""
    max_objects: int = 2
    """Shapes per image (1 or 2)."""
    seed: int = 0
    """The world is a pure function of its settings and this seed."""
    text_vocab_size: int = 500
    """Encoder tokenizer size asked of the trainer (it may stop a little short)."""
    decoder_vocab_size: int = 500
    """Decoder tokenizer base size asked of the trainer (the task tokens come on top)."""

    def __post_init__(self):
        for name in ("num_images", "num_text_pairs", "num_eval_images", "max_objects"):
            check_int("synthetic", name, getattr(self, name))
        if self.max_objects > 2:
            raise ValueError(f"synthetic.max_objects must be 1 or 2, got {self.max_objects}")
        check_int("synthetic", "seed", self.seed, low=0)
        for name in ("text_vocab_size", "decoder_vocab_size"):
            check_int("synthetic", name, getattr(self, name), low=300)


@dataclass(kw_only=True)
class PretrainConfig:
    """Everything ``python -m unigen.train`` needs (see the module docstring for sections)."""

    model: UniGenConfig = field(default_factory=UniGenConfig)
    """The network (paper §4.2 by default)."""
    init: InitConfig = field(default_factory=InitConfig)
    """Pre-trained weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources, task ratios, batch size per rank, loader workers."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """The synthetic world as the data source (made on first use; ``synthetic.dir``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and gradient handling."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Run length (steps: the streams are endless) and learning-rate schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder, seed, device, precision."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resuming."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and progress."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Data parallelism."""

    def __post_init__(self):
        m, d = self.model, self.data
        # Left unset, the pipeline's sizes are the model's.
        if d.image_size is None:
            d.image_size = m.vision.image_size
        if d.max_encoder_len is None:
            d.max_encoder_len = m.text.max_length
        if self.synthetic.dir and (self.init.from_pretrained or self.init.uses_parts):
            raise ValueError("synthetic.dir trains its own tiny tokenizers, which no pre-trained "
                             "model (init.*) reads: use one or the other")
        if self.schedule.epochs and not d.image_shards and not self.synthetic.dir:
            raise ValueError("schedule.epochs: a pre-training epoch is one pass over the "
                             "image-text pairs of data.image_shards (CC3M, paper §4.1); set "
                             "data.image_shards or give the run's length in schedule.steps")
        # The pipeline must produce what the model reads: catch a mismatch here, before any
        # process starts, with the keys to change.
        if not self.init.from_pretrained and not self.init.clip_dir \
                and d.image_size != m.vision.image_size:
            raise ValueError(f"data.image_size ({d.image_size}) must equal "
                             f"model.vision.image_size ({m.vision.image_size})")
        if not self.init.from_pretrained and not self.init.xlmr_dir \
                and d.max_encoder_len > m.text.max_length:
            raise ValueError(f"data.max_encoder_len ({d.max_encoder_len}) exceeds "
                             f"model.text.max_length ({m.text.max_length})")
        if not self.init.from_pretrained and not self.init.gpt2_dir:
            longest = (m.qformer.num_query_tokens + d.max_encoder_len + 1 + d.max_target_len - 1)
            if longest > m.decoder.n_positions:
                raise ValueError(
                    f"the longest decoder sequence (queries {m.qformer.num_query_tokens} + "
                    f"data.max_encoder_len {d.max_encoder_len} + task token + "
                    f"data.max_target_len {d.max_target_len} - 1 = {longest}) exceeds "
                    f"model.decoder.n_positions ({m.decoder.n_positions})")
