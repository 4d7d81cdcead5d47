"""Fixtures of the pre-training tests: a small synthetic world, tiny tokenizers trained on it, and
a factory of tiny fp32 CPU training configs that run a step in well under a second."""

import copy
import os

import pytest

from unigen.data.config import DataConfig
from unigen.data.synthetic_world import all_texts, write_synthetic_world
from unigen.model.config import UniGenConfig
from unigen.model.tokenizers import train_tiny_tokenizers
from unigen.pretraining import PretrainConfig
from unigen.training.config import CheckpointConfig, LoggingConfig, OptimConfig, RunConfig, ScheduleConfig


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread):
    """Every pre-training test runs on one intra-op thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def train_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_world")
    # 32-pixel images: UniGenConfig.tiny()'s ViT input size
    world = write_synthetic_world(str(root / "world"), num_images=120, num_text_pairs=60,
                                  num_eval_images=8, image_size=32, shard_size=40, seed=3)
    tok = train_tiny_tokenizers(all_texts(world), str(root / "tokenizers"),
                                text_vocab_size=400, decoder_vocab_size=400)
    return world, tok


def build_config(train_world, output_dir: str, **sections) -> PretrainConfig:
    """A tiny fp32 CPU config on the synthetic world; ``sections`` override fields per section,
    e.g. ``build_config(w, d, data={"num_workers": 1})``."""
    world, tok = train_world
    model = UniGenConfig.tiny()
    model.text.vocab_size = tok.text_vocab_size
    model.decoder.vocab_size = tok.decoder_vocab_size
    cfg = PretrainConfig(
        model=model,
        data=DataConfig(wikimatrix=tuple(world.wikimatrix),
                        image_shards=tuple(world.image_shards), cc6l=(world.cc6l,),
                        ccqa=(world.ccqa,), image_size=32, encoder_tokenizer=tok.text_dir,
                        decoder_tokenizer=tok.decoder_dir, max_encoder_len=16,
                        max_target_len=32, batch_size=12, num_workers=0,
                        image_backend="pil", mixing="interleave", shuffle_buffer=16),
        optim=OptimConfig(lr=1e-3),
        schedule=ScheduleConfig(steps=6, warmup_steps=2),
        run=RunConfig(output_dir=output_dir, precision="fp32", device="cpu"),
        checkpoint=CheckpointConfig(every=2, keep_last=2),
        logging=LoggingConfig(every=2, progress_bar=False, console=False, tensorboard=False))
    for section, values in sections.items():
        target = getattr(cfg, section)
        for k, v in values.items():
            setattr(target, k, copy.deepcopy(v))
    cfg.__post_init__()
    return cfg


@pytest.fixture
def make_config(train_world, tmp_path):
    def make(name: str = "run", **sections) -> PretrainConfig:
        return build_config(train_world, os.path.join(str(tmp_path), name), **sections)

    return make
