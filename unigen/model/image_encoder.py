"""UniGen's image encoder (paper §3.1): a frozen CLIP ViT, its penultimate-layer features, the
BLIP-2 ``ln_vision`` LayerNorm, the Q-Former with learnable queries, and a projection of the
query outputs to the decoder width (the visual prefix E_v). Also the image preprocessing
(resize to the vision config's size, CLIP mean/std).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unigen.model.config import CLIP_MEAN, CLIP_STD, QFormerConfig, VisionConfig
from unigen.model.qformer import QFormer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _hf_clip_config(cfg: VisionConfig, num_layers: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=cfg.num_attention_heads, layer_norm_eps=cfg.layer_norm_eps,
        hidden_act=cfg.hidden_act, num_channels=3)


def vision_config_from_hf(directory: str | os.PathLike, **overrides) -> VisionConfig:
    """Read a local Hugging Face CLIP (``CLIPModel`` or ``CLIPVisionModel``) config.json."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vision_config_from_hf: no config.json in {os.fspath(directory)!r}")
    with open(path) as f:
        hf = json.load(f)
    v = hf.get("vision_config", hf)
    kw = dict(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 14),
              hidden_size=v.get("hidden_size", 1024), intermediate_size=v.get("intermediate_size", 4096),
              num_hidden_layers=v.get("num_hidden_layers", 24),
              num_attention_heads=v.get("num_attention_heads", 16),
              layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"))
    kw.update(overrides)
    return VisionConfig(**kw)


def vision_config_from_clip_dir(directory: str | os.PathLike, base: VisionConfig) -> VisionConfig:
    """The vision config of a pre-trained CLIP directory: its sizes, with ``base``'s choices of
    how to run it (feature layer, frozen, compute dtype, normalisation) kept."""
    v = vision_config_from_hf(directory)
    for f in ("feature_layer", "frozen", "compute_dtype", "image_mean", "image_std"):
        setattr(v, f, getattr(base, f))
    return v


def build_frozen_clip(vision: VisionConfig) -> nn.Module:
    """The CLIP vision tower as UniGen runs it: only the layers up to ``feature_layer`` are
    built (BLIP-2 reads the penultimate layer, so the last ViT layer would be dead weight), no
    post-LayerNorm; when ``vision.frozen``, without gradients, in eval mode and stored in
    ``vision.compute_dtype``."""
    from transformers import CLIPVisionModel

    from unigen.model.hf_versions import check_transformers_version

    check_transformers_version()
    clip = CLIPVisionModel(_hf_clip_config(vision, vision.num_layers_used))
    # The pooled/post-LayerNorm output is never used (features are token-level).
    clip.post_layernorm = nn.Identity()
    if vision.frozen:
        clip.requires_grad_(False)
        clip.eval()
        clip.to(_DTYPES[vision.compute_dtype])
    return clip


def load_clip_vision_weights(clip: nn.Module, vision: VisionConfig,
                             directory: str | os.PathLike) -> None:
    """Load ``clip`` (:func:`build_frozen_clip`) from a local HF CLIP directory (``CLIPModel``
    or ``CLIPVisionModel``). The checkpoint's layers after ``feature_layer`` and its
    post-LayerNorm are dropped; every other weight must be present (an error lists what is
    missing or mis-shaped)."""
    from transformers import CLIPVisionModel

    loaded = CLIPVisionModel.from_pretrained(os.fspath(directory))
    src = loaded.state_dict()
    dst = clip.state_dict()
    missing = sorted(k for k in dst if k not in src)
    bad = sorted(k for k in dst if k in src and src[k].shape != dst[k].shape)
    if missing or bad:
        raise ValueError(
            f"load_clip_vision: {os.fspath(directory)!r} does not match vision config "
            f"{vision}: missing keys {missing or 'none'}; shape mismatches "
            f"{[(k, tuple(src[k].shape), tuple(dst[k].shape)) for k in bad] or 'none'}")
    clip.load_state_dict({k: src[k] for k in dst}, strict=True)


def vit_forward(clip: nn.Module, vision: VisionConfig, images: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer (``feature_layer``) ViT token features ``[B, 1 + patches, vision
    width]``, float32: what the Q-Former's ``ln_vision`` reads, and what a feature store holds
    (:mod:`unigen.model.vit_features`)."""
    size = vision.image_size
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"ImageEncoder: images must be a [B, 3, {size}, {size}] tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    if tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"ImageEncoder: images must be {size}x{size} (vision.image_size), "
                         f"got {tuple(images.shape[2:])}; resize with preprocess_images")
    dtype = clip.embeddings.patch_embedding.weight.dtype
    with torch.set_grad_enabled(torch.is_grad_enabled() and not vision.frozen):
        h = clip.embeddings(images.to(dtype))
        h = clip.pre_layrnorm(h)
        for layer in clip.encoder.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, (tuple, list)) else out
    return h.float()


class ImageEncoder(nn.Module):
    """``forward(images [B, 3, S, S]) -> (query_out [B, Q, Dq], prefix [B, Q, decoder_width])``.

    ``query_out[:, 0]`` is the image [CLS] of L_CL (§3.3: the first query, not BLIP-2's max over
    queries); ``prefix`` is E_v, what the decoder reads. :meth:`from_vit_features` starts from
    the frozen ViT's output instead (a feature store's, computed once).
    """

    def __init__(self, vision: VisionConfig, qformer: QFormerConfig, decoder_width: int):
        super().__init__()
        self.vision_config = vision
        self.clip = build_frozen_clip(vision)
        # BLIP-2's trainable LayerNorm on the frozen ViT features (Blip2Base.ln_vision).
        self.ln_vision = nn.LayerNorm(vision.hidden_size)
        self.qformer = QFormer(qformer, vision.hidden_size)
        # Q-Former outputs → decoder width (BLIP-2 has the same projection into its LLM).
        self.proj = nn.Linear(qformer.hidden_size, decoder_width)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.vision_config.frozen:
            self.clip.eval()  # frozen: no dropout, and stays frozen under model.train()
        return self

    def load_clip_vision(self, directory: str | os.PathLike) -> None:
        """Load the frozen ViT from a local HF CLIP directory (:func:`load_clip_vision_weights`)."""
        load_clip_vision_weights(self.clip, self.vision_config, directory)

    def vit_features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer ViT token features [B, 1 + patches, vision width], float32."""
        return vit_forward(self.clip, self.vision_config, images)

    def from_vit_features(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query_out, prefix) from the ViT's output ``[B, 1 + patches, vision width]``
        (float32): everything of :meth:`forward` after the frozen ViT."""
        queries = self.qformer(self.ln_vision(feats))
        return queries, self.proj(queries)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_vit_features(self.vit_features(images))


# ---- preprocessing ---------------------------------------------------------------------------
def preprocess_images(images: Any, *, image_size: int, mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> torch.Tensor:
    """Turn images into the float [B, 3, S, S] CLIP-normalised tensor the encoder takes.

    ``images``: a PIL image, a list of PIL images / tensors, or a tensor. uint8 tensors
    ([3, H, W] or [B, 3, H, W], any H, W) and PIL images are resized (bicubic, as CLIP) to S×S and
    normalised; float tensors are taken as already preprocessed and must be S×S.
    """
    mean = torch.tensor(CLIP_MEAN if mean is None else tuple(mean)).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD if std is None else tuple(std)).view(1, 3, 1, 1)

    def from_uint8(x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] uint8
        x = x.float() / 255.0
        if tuple(x.shape[2:]) != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bicubic",
                              align_corners=False, antialias=True).clamp_(0.0, 1.0)
        return (x - mean.to(x.device)) / std.to(x.device)

    def one(x, i) -> torch.Tensor:  # -> [1, 3, S, S]
        if isinstance(x, torch.Tensor):
            if x.dim() == 3:
                x = x.unsqueeze(0)
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"images[{i}] must be [3, H, W] (or [B, 3, H, W]), got {tuple(x.shape)}")
            if x.dtype == torch.uint8:
                return from_uint8(x)
            if not x.is_floating_point():
                raise TypeError(f"images[{i}] must be uint8 (raw pixels) or float (preprocessed), "
                                f"got {x.dtype}")
            if tuple(x.shape[2:]) != (image_size, image_size):
                raise ValueError(
                    f"images[{i}] is a float tensor of size {tuple(x.shape[2:])}, but preprocessed "
                    f"images must be {image_size}x{image_size} (vision.image_size); pass uint8 or "
                    f"PIL images to have them resized")
            return x.float()
        try:
            from PIL import Image
        except ImportError as e:  # pragma: no cover - pillow is a model dependency
            raise TypeError(f"images[{i}] is a {type(x).__name__}; PIL images need pillow") from e
        if isinstance(x, Image.Image):
            import numpy as np

            arr = np.asarray(x.convert("RGB"), dtype=np.uint8).copy()
            return from_uint8(torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0))
        raise TypeError(f"images[{i}] must be a PIL image or a tensor, got {type(x).__name__}")

    if isinstance(images, torch.Tensor):
        if images.dim() == 4 and images.shape[0] == 0:
            raise ValueError("images is empty")
        return one(images, 0)
    if not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        raise ValueError("images is empty")
    out = [one(x, i) for i, x in enumerate(images)]
    return torch.cat([o.to(out[0].device) for o in out], 0)
