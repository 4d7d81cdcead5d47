"""The synthetic world and the tiny tokenizers trained on its text, made once in a folder and
reused by every later run that asks for the same settings.

    <folder>/world/        write_synthetic_world's files (world.json: its settings)
    <folder>/tokenizers/   text/ and decoder/ (Hugging Face layout), tokenizers.json

Each part is written under a temporary name and renamed when complete, so a run stopped while
writing leaves nothing that looks finished; a folder holding a world or tokenizers of other
settings is refused (naming the setting), never silently reused or overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

from unigen.model.tokenizers import DEFAULT_TASK_TOKENS, TinyTokenizers, train_tiny_tokenizers

from .synthetic_world import WorldFiles, all_texts, write_synthetic_world

WORLD_DIR = "world"
TOKENIZERS_DIR = "tokenizers"
TOKENIZERS_MANIFEST = "tokenizers.json"


@dataclass
class SyntheticSetup:
    """What :func:`ensure_synthetic_world` made or found."""

    world: WorldFiles
    tokenizers: TinyTokenizers
    made: tuple[str, ...]
    """The parts written by this call ("world", "tokenizers"); empty when all were reused."""


def _world_settings(num_images, num_text_pairs, num_eval_images, image_size, max_objects,
                    seed) -> dict:
    # the keys of world.json's "counts"
    return {"images": num_images, "text_pairs_per_language": num_text_pairs,
            "eval_images": num_eval_images, "image_size": image_size,
            "max_objects": max_objects, "seed": seed}


# world.json's names → this function's (and the config's) argument names, for the messages
_ARGUMENT = {"images": "num_images", "text_pairs_per_language": "num_text_pairs",
             "eval_images": "num_eval_images"}


def _refuse_other(what: str, path: str, found: dict, wanted: dict) -> None:
    differ = [f"{_ARGUMENT.get(k, k)} {found.get(k)!r}, not {v!r}"
              for k, v in wanted.items() if found.get(k) != v]
    if differ:
        raise ValueError(f"{path} holds a synthetic {what} of other settings "
                         f"({'; '.join(differ)}): remove it or choose another folder")


def _publish(tmp: str, final: str) -> None:
    if os.path.exists(final):  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.rename(tmp, final)


def ensure_synthetic_world(folder: str, *, num_images: int = 2000, num_text_pairs: int = 1000,
                           num_eval_images: int = 200, image_size: int = 64,
                           max_objects: int = 2, seed: int = 0, text_vocab_size: int = 500,
                           decoder_vocab_size: int = 500,
                           task_tokens=DEFAULT_TASK_TOKENS) -> SyntheticSetup:
    """The world and tokenizers in ``folder``: read when present with these settings, written
    when absent, refused when present with others (``ValueError`` naming them)."""
    os.makedirs(folder, exist_ok=True)
    made = []
    world_dir = os.path.join(folder, WORLD_DIR)
    wanted = _world_settings(num_images, num_text_pairs, num_eval_images, image_size,
                             max_objects, seed)
    if os.path.isfile(os.path.join(world_dir, "world.json")):
        world = WorldFiles.load(world_dir)
        _refuse_other("world", world_dir, world.counts, wanted)
    else:
        if os.path.exists(world_dir):
            raise ValueError(f"{world_dir} exists but holds no world.json: remove it or choose "
                             f"another folder")
        tmp = os.path.join(folder, f".tmp-{WORLD_DIR}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        write_synthetic_world(tmp, num_images=num_images, num_text_pairs=num_text_pairs,
                              num_eval_images=num_eval_images, image_size=image_size,
                              max_objects=max_objects, seed=seed)
        _publish(tmp, world_dir)
        world = WorldFiles.load(world_dir)
        made.append("world")

    tok_dir = os.path.join(folder, TOKENIZERS_DIR)
    manifest = os.path.join(tok_dir, TOKENIZERS_MANIFEST)
    wanted = {"text_vocab_size": text_vocab_size, "decoder_vocab_size": decoder_vocab_size,
              "world": wanted}
    if os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as f:
            saved = json.load(f)
        _refuse_other("tokenizer pair", tok_dir, saved["requested"], wanted)
        tok = TinyTokenizers(text_dir=os.path.join(tok_dir, "text"),
                             decoder_dir=os.path.join(tok_dir, "decoder"),
                             text_vocab_size=saved["text_vocab_size"],
                             decoder_vocab_size=saved["decoder_vocab_size"])
    else:
        if os.path.exists(tok_dir):
            raise ValueError(f"{tok_dir} exists but holds no {TOKENIZERS_MANIFEST}: remove it or "
                             f"choose another folder")
        tmp = os.path.join(folder, f".tmp-{TOKENIZERS_DIR}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        trained = train_tiny_tokenizers(all_texts(world), tmp, text_vocab_size=text_vocab_size,
                                        decoder_vocab_size=decoder_vocab_size,
                                        task_tokens=task_tokens)
        # the sizes the model must take: what the trainers reached, which on a small world
        # can fall short of the sizes asked for
        with open(os.path.join(tmp, TOKENIZERS_MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"requested": wanted, "text_vocab_size": trained.text_vocab_size,
                       "decoder_vocab_size": trained.decoder_vocab_size}, f, indent=1)
        _publish(tmp, tok_dir)
        tok = TinyTokenizers(text_dir=os.path.join(tok_dir, "text"),
                             decoder_dir=os.path.join(tok_dir, "decoder"),
                             text_vocab_size=trained.text_vocab_size,
                             decoder_vocab_size=trained.decoder_vocab_size)
        made.append("tokenizers")
    return SyntheticSetup(world=world, tokenizers=tok, made=tuple(made))
