"""``UniGen.save_pretrained`` / ``UniGen.from_pretrained``: config.json + model.safetensors (+ the
attached tokenizers in ``text_tokenizer/`` and ``decoder_tokenizer/``).

Loading is all-or-nothing: the file must hold exactly the model's keys with the model's shapes, or
a :class:`CheckpointError` lists the missing, unexpected and mis-shaped keys. A truncated or
corrupt file raises the same error class, never a half-initialised model.
"""

from __future__ import annotations

import os

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TEXT_TOKENIZER_DIR = "text_tokenizer"
DECODER_TOKENIZER_DIR = "decoder_tokenizer"


class CheckpointError(ValueError):
    """A checkpoint that does not match the model (or cannot be read)."""


def save_pretrained(model, directory) -> None:
    from safetensors.torch import save_file

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model.config.save(os.path.join(directory, CONFIG_NAME))
    # Tensors are written contiguous and un-shared (safetensors refuses aliasing views);
    # the tied LM head is wte itself, so there is nothing to deduplicate.
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(directory, WEIGHTS_NAME), metadata={"format": "pt", "model": "UniGen"})
    if model.text_tokenizer is not None:
        model.text_tokenizer.save_pretrained(os.path.join(directory, TEXT_TOKENIZER_DIR))
    if model.decoder_tokenizer is not None:
        model.decoder_tokenizer.save_pretrained(os.path.join(directory, DECODER_TOKENIZER_DIR))


def read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise CheckpointError(f"no weights file {path!r}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise CheckpointError(f"cannot read {path!r} (truncated or corrupt?): {e}") from e


def check_state_dict(model, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in set(own) & set(sd) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad:
        def fmt(xs):
            return ("none" if not xs else
                    ", ".join(xs[:20]) + (f", ... ({len(xs)} in all)" if len(xs) > 20 else ""))

        raise CheckpointError(
            f"{source} does not match the model built from its config: missing keys: "
            f"{fmt(missing)}; unexpected keys: {fmt(unexpected)}; shape mismatches: {fmt(bad)}")


def load_pretrained(cls, directory, *, map_location="cpu", load_tokenizers: bool = True):
    from unigen.model.config import UniGenConfig

    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"UniGen.from_pretrained: no {CONFIG_NAME} in {directory!r}"
                              + _model_folder_hint(directory))
    try:
        config = UniGenConfig.load(cfg_path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"UniGen.from_pretrained: bad {cfg_path!r}: {e}") from e
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    sd = read_weights(weights_path)
    model = cls(config)
    check_state_dict(model, sd, f"UniGen.from_pretrained: {weights_path!r}")
    model.load_state_dict(sd, strict=True)
    model.to(map_location)
    if load_tokenizers:
        t_dir = os.path.join(directory, TEXT_TOKENIZER_DIR)
        d_dir = os.path.join(directory, DECODER_TOKENIZER_DIR)
        if os.path.isdir(t_dir) and os.path.isdir(d_dir):
            from unigen.model.tokenizers import load_decoder_tokenizer, load_text_tokenizer

            model.set_tokenizers(load_text_tokenizer(t_dir),
                                 load_decoder_tokenizer(d_dir, config.tasks.task_tokens))
    # As transformers' from_pretrained: ready for inference (dropout off); training code calls
    # .train() itself.
    return model.eval()


def load_frozen_vit(directory):
    """``(clip, vision config)``: the frozen CLIP ViT of a ``save_pretrained`` folder alone, as
    the model built from it runs it (:func:`unigen.model.image_encoder.build_frozen_clip`); only
    its ``image_encoder.clip.*`` weights are read from the file."""
    from safetensors import safe_open

    from unigen.model.config import UniGenConfig
    from unigen.model.image_encoder import build_frozen_clip

    directory = os.fspath(directory)
    cfg_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"no {CONFIG_NAME} in {directory!r}" + _model_folder_hint(directory))
    try:
        vision = UniGenConfig.load(cfg_path).vision
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad {cfg_path!r}: {e}") from e
    clip = build_frozen_clip(vision)
    weights_path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        raise CheckpointError(f"no weights file {weights_path!r}")
    prefix = "image_encoder.clip."
    try:
        with safe_open(weights_path, framework="pt") as f:
            sd = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise CheckpointError(f"cannot read {weights_path!r} (truncated or corrupt?): {e}") from e
    check_state_dict(clip, sd, f"the ViT weights ({prefix}*) of {weights_path!r}")
    clip.load_state_dict(sd, strict=True)
    return clip, vision


def _model_folder_hint(directory: str) -> str:
    """Where the model is when ``directory`` is a training run folder or one of its
    checkpoints (a common slip: pointing at the run instead of its model)."""
    found = [os.path.join(directory, sub) for sub in ("final_model", "model")
             if os.path.isfile(os.path.join(directory, sub, CONFIG_NAME))]
    ckpts = os.path.join(directory, "checkpoints")
    if os.path.isdir(ckpts):
        steps = sorted(d for d in os.listdir(ckpts) if d.startswith("step_")
                       and os.path.isfile(os.path.join(ckpts, d, "model", CONFIG_NAME)))
        if steps:
            found.append(os.path.join(ckpts, steps[-1], "model"))
    if not found:
        return ""
    return ("; this looks like a training run or checkpoint folder: the model is in "
            + " or ".join(repr(f) for f in found))
