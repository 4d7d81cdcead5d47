"""The BLIP-2 Q-Former, query path only (paper §3.1).

BLIP-2's Q-Former is a BERT-base whose layers run learnable queries (and, in BLIP-2's own
stage 1, text) through shared self-attention; the queries alone also cross-attend to the frozen
ViT features every ``cross_attention_freq`` layers and have their own MLP (``*_query`` weights).
UniGen only needs the image path: the queries' outputs are the visual prefix E_v of the decoder
and the first one is the image [CLS] of L_CL (§3.3). So this module holds exactly the query-path
weights; :mod:`unigen.model.lavis_remap` maps LAVIS's checkpoint names onto them.

Post-LayerNorm BERT blocks, GELU, dropout as BERT.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unigen.model.config import QFormerConfig


class QFormerAttention(nn.Module):
    """Multi-head attention with BERT's post-norm residual (``LayerNorm(x + o(attn))``)."""

    def __init__(self, cfg: QFormerConfig, kv_width: int):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(kv_width, cfg.hidden_size)
        self.v = nn.Linear(kv_width, cfg.hidden_size)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attention_dropout = cfg.attention_dropout
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, Q, D = x.shape
        H = self.num_heads
        q = self.q(x).view(B, Q, H, D // H).transpose(1, 2)
        k = self.k(context).view(B, context.shape[1], H, D // H).transpose(1, 2)
        v = self.v(context).view(B, context.shape[1], H, D // H).transpose(1, 2)
        # Every query sees every query / image patch (no padding anywhere on this path).
        a = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        a = a.transpose(1, 2).reshape(B, Q, D)
        return self.norm(x + self.dropout(self.o(a)))


class QFormerMLP(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # BERT's exact (erf) GELU, as in the pre-trained Q-Former.
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, index: int, vision_width: int):
        super().__init__()
        self.self_attn = QFormerAttention(cfg, cfg.hidden_size)
        # BLIP-2 inserts cross-attention in layers 0, freq, 2·freq, ... (every other layer).
        self.has_cross_attention = index % cfg.cross_attention_freq == 0
        self.cross_attn = QFormerAttention(cfg, vision_width) if self.has_cross_attention else None
        self.mlp = QFormerMLP(cfg)

    def forward(self, x: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        x = self.self_attn(x, x)
        if self.cross_attn is not None:
            x = self.cross_attn(x, image_feats)
        return self.mlp(x)


class QFormer(nn.Module):
    """``forward(image_feats [B, N, vision_width]) -> [B, num_query_tokens, hidden_size]``."""

    def __init__(self, cfg: QFormerConfig, vision_width: int):
        super().__init__()
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.hidden_size))
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embed_dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(cfg, i, vision_width) for i in range(cfg.num_hidden_layers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.query_tokens, std=std)

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        if image_feats.dim() != 3:
            raise ValueError(f"QFormer: image_feats must be [B, N, C], got {tuple(image_feats.shape)}")
        x = self.query_tokens.expand(image_feats.shape[0], -1, -1)
        # BLIP-2's BertEmbeddings with only query_embeds: LayerNorm, then dropout.
        x = self.embed_dropout(self.embed_norm(x))
        for layer in self.layers:
            x = layer(x, image_feats)
        return x

    @staticmethod
    def num_parameters_estimate(cfg: QFormerConfig, vision_width: int) -> int:
        """Closed-form parameter count (used to cross-check the meta-device count)."""
        D, I = cfg.hidden_size, cfg.intermediate_size
        attn = 4 * D * D + 4 * D + 2 * D
        cross = 2 * D * D + 2 * vision_width * D + 4 * D + 2 * D
        mlp = 2 * D * I + I + D + 2 * D
        n_cross = math.ceil(cfg.num_hidden_layers / cfg.cross_attention_freq)
        return (cfg.num_query_tokens * D + 2 * D + cfg.num_hidden_layers * (attn + mlp)
                + n_cross * cross)
