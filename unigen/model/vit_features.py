"""The frozen ViT's output as a stored value: computed once, kept on disk (a feature store,
:mod:`unigen.data.feature_store`) and handed to the model in a batch instead of pixels.

What is stored is exactly what :func:`unigen.model.image_encoder.vit_forward` returns, the
tensor BLIP-2's trainable ``ln_vision`` reads: ``[1 + patches, vision width]`` per image (CLIP
ViT-L/14 at 224: 257 × 1024). Everything after it — ``ln_vision``, the Q-Former, the decoder,
L_CL and the mining — runs as it does from pixels.

Encodings (the store's ``--dtype``):

- ``fp32``: the ViT's output as computed: bit-exact whatever the ViT's precision (4 bytes per
  value, 1.05 MB per ViT-L/14 image);
- ``bf16``: 2 bytes per value (526 KB per image); bit-exact when the ViT's output already is bf16
  values (``vision.compute_dtype: bfloat16`` without autocast), else the ViT's output rounded to
  the nearest bf16 (relative error at most 2^-8);
- ``fp8``: float8 e4m3 with one float32 scale per image (``amax / 448``, e4m3's largest value,
  so the image's largest feature maps to it): 1 byte per value (263 KB per image), 3 mantissa
  bits, a relative error of at most 2^-4 per value for the values e4m3 represents as normal
  numbers (the measured error is in docs/training.md).

A stored feature belongs to one ViT: :func:`vit_weights_hash` names the weights that made it, and
a store made with other weights is refused (:mod:`unigen.data.feature_store`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from unigen.model.config import VisionConfig

FEATURE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}
"""The encodings of a stored feature, by the name a store records."""

FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448: e4m3's largest finite value


def feature_shape(vision: VisionConfig) -> tuple[int, int]:
    """``(tokens, width)`` of one image's ViT output: the class token and every patch."""
    return vision.num_patches + 1, vision.hidden_size


@dataclass
class ImageFeatures:
    """Stored ViT outputs of ``N`` images: ``values`` ``[N, tokens, width]`` in an encoding of
    :data:`FEATURE_DTYPES`, and for fp8 the per-image ``scales`` ``[N]`` (float32; None
    otherwise). :meth:`dequantize` gives the float32 features the model reads."""

    values: torch.Tensor
    scales: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.values, torch.Tensor) or self.values.dim() != 3:
            got = (tuple(self.values.shape) if isinstance(self.values, torch.Tensor)
                   else type(self.values).__name__)
            raise ValueError(f"ImageFeatures.values must be a [N, tokens, width] tensor, got {got}")
        if self.values.dtype not in FEATURE_DTYPES.values():
            raise TypeError(f"ImageFeatures.values has dtype {self.values.dtype}, expected one of "
                            f"{sorted(str(d) for d in FEATURE_DTYPES.values())}")
        fp8 = self.values.dtype == torch.float8_e4m3fn
        if fp8 != (self.scales is not None):
            raise ValueError("ImageFeatures: fp8 values need their per-image scales, and only "
                             "fp8 values have scales")
        if self.scales is not None and tuple(self.scales.shape) != (self.values.shape[0],):
            raise ValueError(f"ImageFeatures.scales must be [{self.values.shape[0]}], got "
                             f"{tuple(self.scales.shape)}")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def dequantize(self) -> torch.Tensor:
        """The features as float32 ``[N, tokens, width]``."""
        return dequantize(self.values, self.scales)

    @staticmethod
    def cat(parts: list["ImageFeatures"]) -> "ImageFeatures":
        if not parts:
            raise ValueError("ImageFeatures.cat needs at least one part")
        dtypes = {p.values.dtype for p in parts}
        if len(dtypes) > 1:
            raise ValueError(f"ImageFeatures.cat: parts of different encodings {sorted(map(str, dtypes))}")
        scales = None if parts[0].scales is None else torch.cat([p.scales for p in parts])
        return ImageFeatures(torch.cat([p.values for p in parts]), scales)

    def select(self, rows: list[int]) -> "ImageFeatures":
        index = torch.as_tensor(rows, dtype=torch.long)
        return ImageFeatures(self.values[index],
                             None if self.scales is None else self.scales[index])


def encode(features: torch.Tensor, dtype: str) -> ImageFeatures:
    """Float ViT outputs ``[N, tokens, width]`` in the encoding ``dtype`` (fp32, bf16, fp8)."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    if features.dim() != 3 or not features.is_floating_point():
        raise ValueError(f"encode: features must be a float [N, tokens, width] tensor, got "
                         f"{features.dtype} {tuple(features.shape)}")
    x = features.float()
    if dtype != "fp8":
        return ImageFeatures(x.to(FEATURE_DTYPES[dtype]))
    # One scale per image: its largest magnitude lands on e4m3's largest value, so no value
    # saturates and the image uses e4m3's whole range (an all-zero image keeps scale 1).
    amax = x.abs().amax(dim=(1, 2))
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # the clamp only absorbs the division's rounding at amax (e4m3fn has no infinity)
    q = (x / scales[:, None, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return ImageFeatures(q, scales)


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """float32 features of stored ``values`` (and fp8's per-image ``scales``), on their device."""
    x = values.float()
    return x if scales is None else x * scales.float()[:, None, None]


def vit_weights_hash(clip: nn.Module) -> str:
    """sha256 of the ViT's weights as the model runs them (names, dtypes, shapes and bytes, in
    name order): the same weights give the same hash whether they came from a CLIP directory or
    a ``save_pretrained`` folder, and weights stored in another dtype give another one."""
    digest = hashlib.sha256()
    for name, tensor in sorted(clip.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


VISION_FIELDS = ("image_size", "patch_size", "hidden_size", "intermediate_size",
                 "num_attention_heads", "layer_norm_eps", "hidden_act", "feature_layer",
                 "compute_dtype")
"""The vision-config fields a stored feature depends on besides the weights (a store records
them; :func:`vision_fingerprint`)."""


def vision_fingerprint(vision: VisionConfig) -> dict:
    """The fields of :data:`VISION_FIELDS` and the number of ViT layers that run."""
    values = dataclasses.asdict(vision)
    return {**{f: values[f] for f in VISION_FIELDS}, "layers_used": vision.num_layers_used}
