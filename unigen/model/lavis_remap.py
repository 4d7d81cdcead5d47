"""Load the BLIP-2 Q-Former from LAVIS's released checkpoint (e.g. ``blip2_pretrained_vitL.pth``).

LAVIS stores the Q-Former as a Hugging Face-style BERT (``Qformer.bert.encoder.layer.N...``) that
also carries BLIP-2's text path (word/position embeddings, the text MLP ``intermediate``/
``output``, the LM head ``Qformer.cls``). UniGen keeps the query path only
(:mod:`unigen.model.qformer`), plus ``ln_vision`` and the 256-d ``vision_proj`` of BLIP-2's
image-text contrastive loss, and the temperature ``temp`` (τ; stored here as log(1/τ)).

Everything else in the file (LAVIS's own ViT ``visual_encoder.*`` - UniGen loads CLIP from an HF
directory instead -, the text path, ``text_proj``, ``itm_head``) is reported as ignored.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import torch

# LAVIS name (inside one Q-Former layer) → ours.
_LAYER_MAP = {
    "attention.self.query": "self_attn.q",
    "attention.self.key": "self_attn.k",
    "attention.self.value": "self_attn.v",
    "attention.output.dense": "self_attn.o",
    "attention.output.LayerNorm": "self_attn.norm",
    "crossattention.self.query": "cross_attn.q",
    "crossattention.self.key": "cross_attn.k",
    "crossattention.self.value": "cross_attn.v",
    "crossattention.output.dense": "cross_attn.o",
    "crossattention.output.LayerNorm": "cross_attn.norm",
    "intermediate_query.dense": "mlp.fc1",
    "output_query.dense": "mlp.fc2",
    "output_query.LayerNorm": "mlp.norm",
}
# The text path of BLIP-2's Q-Former: present in the checkpoint, unused by UniGen.
_TEXT_ONLY_LAYER = ("intermediate.dense", "output.dense", "output.LayerNorm")
_LAYER_RE = re.compile(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


@dataclass
class RemapResult:
    """The remapped weights (names of ``UniGen.state_dict()``) and what was left out."""

    state_dict: dict[str, torch.Tensor]
    ignored: list[str] = field(default_factory=list)


def remap_lavis_qformer_state_dict(lavis_sd: dict[str, torch.Tensor]) -> RemapResult:
    """Map LAVIS BLIP-2 keys to UniGen's (``image_encoder.qformer.*``, ``image_encoder.ln_vision.*``,
    ``image_proj.*``, ``logit_scale``). Unknown ``Qformer.bert`` keys raise: a checkpoint of another
    layout must not load half-way."""
    if "model" in lavis_sd and isinstance(lavis_sd["model"], dict):
        lavis_sd = lavis_sd["model"]  # LAVIS saves {"model": state_dict, ...}
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in lavis_sd.items():
        m = _LAYER_RE.match(key)
        if m:
            layer, name, kind = m.groups()
            if name in _LAYER_MAP:
                out[f"image_encoder.qformer.layers.{layer}.{_LAYER_MAP[name]}.{kind}"] = value
            elif name in _TEXT_ONLY_LAYER:
                ignored.append(key)
            else:
                raise ValueError(f"remap_lavis_qformer_state_dict: unknown Q-Former key {key!r}")
        elif key == "query_tokens":
            out["image_encoder.qformer.query_tokens"] = value
        elif key.startswith("Qformer.bert.embeddings.LayerNorm."):
            out["image_encoder.qformer.embed_norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("ln_vision."):
            out["image_encoder." + key] = value
        elif key.startswith("vision_proj."):
            out["image_proj." + key.split(".", 1)[1]] = value
        elif key == "temp":
            # LAVIS stores τ; UniGen stores log(1/τ), CLIP style.
            out["logit_scale"] = torch.log(1.0 / value.detach().float().reshape(()))
        elif key.startswith("Qformer.bert."):
            if key.startswith(("Qformer.bert.embeddings.word_embeddings",
                               "Qformer.bert.embeddings.position_embeddings",
                               "Qformer.bert.embeddings.position_ids")):
                ignored.append(key)
            else:
                raise ValueError(f"remap_lavis_qformer_state_dict: unknown Q-Former key {key!r}")
        else:
            ignored.append(key)  # visual_encoder.*, Qformer.cls.*, text_proj, itm_head, ...
    return RemapResult(out, ignored)


def load_lavis_qformer_checkpoint(model, checkpoint, *, strict: bool = True) -> RemapResult:
    """Load LAVIS BLIP-2 Q-Former weights into ``model`` (a UniGen).

    checkpoint: a path to LAVIS's ``.pth`` file or an already loaded state dict. With ``strict``
    every Q-Former, ln_vision and image_proj weight of the model must come from the checkpoint
    with the right shape; otherwise a ValueError lists what is missing or mis-shaped.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        path = os.fspath(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_lavis_qformer_checkpoint: no file {path!r}")
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"load_lavis_qformer_checkpoint: cannot read {path!r}: {e}") from e
    elif isinstance(checkpoint, dict):
        sd = checkpoint
    else:
        raise TypeError(f"load_lavis_qformer_checkpoint: checkpoint must be a path or a state dict, "
                        f"got {type(checkpoint).__name__}")
    res = remap_lavis_qformer_state_dict(sd)
    own = model.state_dict()
    expected = [k for k in own if k.startswith(("image_encoder.qformer.", "image_encoder.ln_vision.",
                                                "image_proj."))]
    missing = sorted(k for k in expected if k not in res.state_dict)
    unexpected = sorted(k for k in res.state_dict if k not in own)
    bad = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in res.state_dict.items() if k in own and v.shape != own[k].shape)
    if unexpected or bad or (strict and missing):
        raise ValueError(
            "load_lavis_qformer_checkpoint: the checkpoint does not match the model's Q-Former "
            f"config; missing keys: {missing or 'none'}; unexpected keys: {unexpected or 'none'}; "
            f"shape mismatches: {bad or 'none'}")
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    with torch.no_grad():
        for k, v in res.state_dict.items():
            if k == "logit_scale":
                v = v.clamp(max=math.log(model.config.loss.max_logit_scale))
            tensors[k].copy_(v.to(tensors[k].dtype))
    return res
