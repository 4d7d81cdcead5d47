"""The demo's stand-in for a pre-trained CLIP: a tiny Hugging Face ``CLIPVisionModel`` trained
contrastively on the synthetic world's English image-caption shards, saved where
``init.clip_dir`` reads it.

The paper does not train its image encoder: it starts from CLIP ViT-L/14, pre-trained on
English image-text pairs, and keeps it frozen (§3.1, §4.2). A world made up on the spot has no
such model, so the demo makes one the same way — English captions only, image-text contrast only
— and every demo run then starts from it exactly as a paper run starts from CLIP
(``UniGen.from_pretrained_parts(clip_dir=...)``, ViT frozen). Nothing multilingual and no
UniGen task reaches it, so it is the same, shared starting point for every run of one seed.

Why the demo needs it: a UniGen trained from scratch without translation pairs never learned
*where* the object is (its English R@1 stayed under 15% while UniGen's reached 65-88%; caption
loss stalled at 0.45). With translation pairs the decoder meets an informative prefix from the
first step; without them its only prefix is a from-scratch image encoder's, and the ablation
then differed from UniGen in far more than the ablated data. With the image side pre-trained,
as in the paper, both start from an image encoder that already separates positions.

The text side used for the contrast (a bag of word embeddings) is thrown away: only the ViT is
saved, as CLIP's text tower is unused by UniGen.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from unigen.data.image_pipeline import ImageSpec, PilImageDecoder
from unigen.data.webdataset_images import WebdatasetImageTextStream


def _load_pairs(image_shards, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """Every (image, English caption) of the webdataset shards, read as the captioning stream
    reads them and preprocessed as the training pipeline does (``image_backend: pil``)."""
    samples = list(WebdatasetImageTextStream(list(image_shards), rank=0, world_size=1))
    images, ok = PilImageDecoder(ImageSpec(image_size)).decode([s["image"] for s in samples])
    if len(ok) != len(samples):
        raise ValueError(f"tiny CLIP: {len(samples) - len(ok)} training images could not be "
                         f"decoded")
    return images, [s["caption"] for s in samples]


class _BagOfWords(nn.Module):
    """The contrast's text side: mean of word embeddings, projected. Captions of this world are
    unordered facts (colour, shape, position), so word order carries nothing a bag misses."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.proj(self.embed(ids, offsets))


def train_tiny_clip(image_shards, out_dir: str, *, vision,
                    steps: int = 300, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                    eval_shards=(), log_every: int = 100) -> dict:
    """Train the ViT described by ``vision`` (a :class:`~unigen.model.config.VisionConfig`;
    all layers are built, as a CLIP checkpoint has them) with a symmetric InfoNCE loss, pairs
    with the same caption counted as positives of each other, and save it to ``out_dir`` as a
    ``CLIPVisionModel``. Returns ``{"steps", "final_loss", "seconds", "eval_i2t_r1"}``, the last
    (image→caption R@1 among the held-out images' captions, identical captions counted as hits)
    only with ``eval_shards``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    start = time.perf_counter()
    torch.manual_seed(seed)
    images, captions = _load_pairs(image_shards, vision.image_size)
    distinct = sorted(set(captions))
    caption_index = {c: i for i, c in enumerate(distinct)}
    caption_id = torch.tensor([caption_index[c] for c in captions])
    words = {w: i for i, w in enumerate(sorted({w for c in distinct for w in c.split()}))}
    token_ids = [[words[w] for w in c.split()] for c in distinct]

    hf = CLIPVisionConfig(hidden_size=vision.hidden_size,
                          intermediate_size=vision.intermediate_size,
                          num_hidden_layers=vision.num_hidden_layers,
                          num_attention_heads=vision.num_attention_heads,
                          image_size=vision.image_size, patch_size=vision.patch_size,
                          hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps)
    vit = CLIPVisionModel(hf)
    dim = 64
    image_proj = nn.Linear(vision.hidden_size, dim, bias=False)
    text = _BagOfWords(len(words), dim)
    log_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), CLIP's initial temperature
    params = [*vit.parameters(), *image_proj.parameters(), *text.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        idx = torch.randint(len(captions), (batch_size,), generator=gen)
        cap = caption_id[idx]
        ids = [token_ids[c] for c in cap.tolist()]
        flat = torch.tensor([t for row in ids for t in row])
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]]).cumsum(0)
        img = F.normalize(image_proj(vit(pixel_values=images[idx]).pooler_output), dim=-1)
        txt = F.normalize(text(flat, offsets), dim=-1)
        logits = log_scale.exp().clamp(max=100) * img @ txt.t()
        same = (cap[:, None] == cap[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-target * F.log_softmax(logits.t(), 1), 1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss = loss.detach()
        if log_every and (step % log_every == 0 or step == steps):
            print(f"[tiny CLIP] step {step}/{steps} loss {loss.item():.3f}", flush=True)
    info = {"steps": steps, "final_loss": loss.item()}
    if eval_shards:
        with torch.no_grad():
            ev_images, ev_captions = _load_pairs(eval_shards, vision.image_size)
            unknown = [c for c in ev_captions if any(w not in words for w in c.split())]
            if unknown:
                raise ValueError(f"tiny CLIP: held-out captions with words never trained on, "
                                 f"e.g. {unknown[0]!r}")
            ids = [[words[w] for w in c.split()] for c in ev_captions]
            flat = torch.tensor([t for row in ids for t in row])
            offsets = torch.tensor([0] + [len(r) for r in ids[:-1]]).cumsum(0)
            img = F.normalize(image_proj(vit(pixel_values=ev_images).pooler_output), dim=-1)
            txt = F.normalize(text(flat, offsets), dim=-1)
            top = (img @ txt.t()).argmax(1).tolist()
            info["eval_i2t_r1"] = sum(ev_captions[j] == ev_captions[i]
                                      for i, j in enumerate(top)) / len(top)
    os.makedirs(out_dir, exist_ok=True)
    vit.save_pretrained(out_dir)
    return {**info, "seconds": time.perf_counter() - start}
