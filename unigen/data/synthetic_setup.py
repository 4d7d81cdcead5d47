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


def _part(folder: str, name: str, marker: str, write) -> bool:
    """``folder/name``, which is complete when it holds ``marker``: written by ``write(tmp)``
    under a temporary name and renamed when it is not there; returns whether it was written."""
    final = os.path.join(folder, name)
    if os.path.isfile(os.path.join(final, marker)):
        return False
    if os.path.exists(final):
        raise ValueError(f"{final} exists but holds no {marker}: remove it or choose another "
                         f"folder")
    tmp = os.path.join(folder, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if os.path.exists(final):  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.rename(tmp, final)
    return True


def ensure_synthetic_world(folder: str, *, num_images: int = 2000, num_text_pairs: int = 1000,
                           num_eval_images: int = 200, image_size: int = 64,
                           max_objects: int = 2, seed: int = 0, text_vocab_size: int = 500,
                           decoder_vocab_size: int = 500,
                           task_tokens=DEFAULT_TASK_TOKENS) -> SyntheticSetup:
    """The world and tokenizers in ``folder``: read when present with these settings, written
    when absent, refused when present with others (``ValueError`` naming them)."""
    os.makedirs(folder, exist_ok=True)
    made = []
    settings = _world_settings(num_images, num_text_pairs, num_eval_images, image_size,
                               max_objects, seed)
    if _part(folder, WORLD_DIR, "world.json", lambda tmp: write_synthetic_world(
            tmp, num_images=num_images, num_text_pairs=num_text_pairs,
            num_eval_images=num_eval_images, image_size=image_size, max_objects=max_objects,
            seed=seed)):
        made.append("world")
    world_dir = os.path.join(folder, WORLD_DIR)
    world = WorldFiles.load(world_dir)
    _refuse_other("world", world_dir, world.counts, settings)

    wanted = {"text_vocab_size": text_vocab_size, "decoder_vocab_size": decoder_vocab_size,
              "world": settings}

    def train_tokenizers(tmp: str) -> None:
        trained = train_tiny_tokenizers(all_texts(world), tmp, text_vocab_size=text_vocab_size,
                                        decoder_vocab_size=decoder_vocab_size,
                                        task_tokens=task_tokens)
        # the sizes the model must take: what the trainers reached, which on a small world
        # can fall short of the sizes asked for
        with open(os.path.join(tmp, TOKENIZERS_MANIFEST), "w", encoding="utf-8") as f:
            json.dump({"requested": wanted, "text_vocab_size": trained.text_vocab_size,
                       "decoder_vocab_size": trained.decoder_vocab_size}, f, indent=1)

    if _part(folder, TOKENIZERS_DIR, TOKENIZERS_MANIFEST, train_tokenizers):
        made.append("tokenizers")
    tok_dir = os.path.join(folder, TOKENIZERS_DIR)
    with open(os.path.join(tok_dir, TOKENIZERS_MANIFEST), encoding="utf-8") as f:
        saved = json.load(f)
    _refuse_other("tokenizer pair", tok_dir, saved["requested"], wanted)
    tok = TinyTokenizers(text_dir=os.path.join(tok_dir, "text"),
                         decoder_dir=os.path.join(tok_dir, "decoder"),
                         text_vocab_size=saved["text_vocab_size"],
                         decoder_vocab_size=saved["decoder_vocab_size"])
    return SyntheticSetup(world=world, tokenizers=tok, made=tuple(made))
