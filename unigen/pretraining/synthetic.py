"""``synthetic.dir``: the synthetic world and its tokenizers as a pre-training run's data.

:func:`with_synthetic_world` makes (or reuses) them and returns the config with ``data``'s
sources and tokenizer folders filled in and the model's vocabulary sizes set to the
tokenizers', so that the sizes agree by construction (``configs/tiny.yaml`` is one command on
a fresh clone). Under torchrun rank 0 writes them while the others wait; every rank then reads
the same files and resolves the same config.
"""

from __future__ import annotations

import dataclasses
import time

from unigen.configuration import ConfigError
from unigen.data.synthetic_setup import ensure_synthetic_world
from unigen.training.distributed import DistEnv, gather_objects

from .config import PretrainConfig

# data's keys the world supplies
_SOURCES = ("wikimatrix", "cclm_text_pairs", "image_shards", "cc6l", "ccqa")
_TOKENIZERS = ("encoder_tokenizer", "decoder_tokenizer")


def with_synthetic_world(config: PretrainConfig, env: DistEnv, log=print) -> PretrainConfig:
    """``config`` resolved against its synthetic world (made by rank 0 when missing); the
    config itself when ``synthetic.dir`` is empty."""
    syn = config.synthetic
    if not syn.dir:
        return config
    settings = dict(num_images=syn.num_images, num_text_pairs=syn.num_text_pairs,
                    num_eval_images=syn.num_eval_images, image_size=config.data.image_size,
                    max_objects=syn.max_objects, seed=syn.seed,
                    text_vocab_size=syn.text_vocab_size,
                    decoder_vocab_size=syn.decoder_vocab_size,
                    task_tokens=config.model.tasks.task_tokens)
    error = None
    if env.is_main:
        start = time.perf_counter()
        try:
            setup = ensure_synthetic_world(syn.dir, **settings)
        except ValueError as e:
            error = str(e)
        else:
            if setup.made:
                log(f"synthetic world: wrote the {' and the '.join(setup.made)} into {syn.dir} "
                    f"in {time.perf_counter() - start:.1f} s ({syn.num_images} images, "
                    f"{syn.num_text_pairs} translation pairs per language; reused by later runs)")
            else:
                log(f"synthetic world: reusing {syn.dir}")
    error = gather_objects(error, env)[0]  # every rank stops on rank 0's error, or none does
    if error is None and not env.is_main:  # every file is there now: this only reads them
        try:
            setup = ensure_synthetic_world(syn.dir, **settings)
        except ValueError as e:
            error = str(e)
    if error is not None:
        raise ConfigError(f"synthetic.dir: {error}", kind="invalid")
    world, tok = setup.world, setup.tokenizers
    supplied = {"wikimatrix": tuple(world.wikimatrix), "cclm_text_pairs": (),
                "image_shards": tuple(world.image_shards), "cc6l": (world.cc6l,),
                "ccqa": (world.ccqa,), "encoder_tokenizer": tok.text_dir,
                "decoder_tokenizer": tok.decoder_dir}
    d = config.data
    for key in _SOURCES + _TOKENIZERS:
        value = getattr(d, key)
        if value and value != supplied[key]:
            raise ConfigError(f"data.{key} is set ({value!r}) and synthetic.dir too: the "
                              f"synthetic world supplies the data; clear one of them",
                              kind="invalid")
    model = config.model
    model = dataclasses.replace(
        model, text=dataclasses.replace(model.text, vocab_size=tok.text_vocab_size),
        decoder=dataclasses.replace(model.decoder, vocab_size=tok.decoder_vocab_size))
    return dataclasses.replace(config, model=model,
                               data=dataclasses.replace(d, **supplied))
