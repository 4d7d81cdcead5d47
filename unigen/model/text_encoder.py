"""UniGen's multilingual text encoder (paper §3.1): XLM-R base, at most 40 tokens (§4.2).

Its last hidden states are the text prefix E_t of the decoder (projected only when the widths
differ: XLM-R base and GPT-2 base are both 768 wide), and its first token (``<s>``) is the
text [CLS] of L_CL (§3.3).
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from unigen.model.config import TextEncoderConfig


def _hf_xlmr_config(cfg: TextEncoderConfig):
    from transformers import XLMRobertaConfig

    return XLMRobertaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
        pad_token_id=cfg.pad_token_id, bos_token_id=0, eos_token_id=2, type_vocab_size=1,
        layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=cfg.hidden_dropout,
        attention_probs_dropout_prob=cfg.attention_dropout, initializer_range=cfg.initializer_range)


def text_config_from_hf(directory: str | os.PathLike, **overrides) -> TextEncoderConfig:
    """Read a local Hugging Face XLM-R config.json into a :class:`TextEncoderConfig`."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"text_config_from_hf: no config.json in {os.fspath(directory)!r}")
    with open(path) as f:
        hf = json.load(f)
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=hf["num_attention_heads"],
              intermediate_size=hf["intermediate_size"],
              max_position_embeddings=hf["max_position_embeddings"],
              pad_token_id=hf.get("pad_token_id", 1), layer_norm_eps=hf.get("layer_norm_eps", 1e-5))
    kw.update(overrides)
    return TextEncoderConfig(**kw)


class TextEncoder(nn.Module):
    """``forward(ids [N, L], mask [N, L]) -> (hidden [N, L, Dt], prefix [N, L, decoder_width])``."""

    def __init__(self, cfg: TextEncoderConfig, decoder_width: int):
        super().__init__()
        from transformers import XLMRobertaModel

        self.config = cfg
        self.model = XLMRobertaModel(_hf_xlmr_config(cfg), add_pooling_layer=False)
        self.proj = (nn.Identity() if cfg.hidden_size == decoder_width
                     else nn.Linear(cfg.hidden_size, decoder_width))

    def load_hf(self, directory: str | os.PathLike) -> None:
        """Load xlm-roberta weights from a local HF directory (pooler/LM head ignored)."""
        from transformers import XLMRobertaModel

        loaded = XLMRobertaModel.from_pretrained(os.fspath(directory), add_pooling_layer=False)
        src, dst = loaded.state_dict(), self.model.state_dict()
        missing = sorted(k for k in dst if k not in src)
        bad = sorted(k for k in dst if k in src and src[k].shape != dst[k].shape)
        if missing or bad:
            raise ValueError(
                f"TextEncoder.load_hf: {os.fspath(directory)!r} does not match the text config: "
                f"missing keys {missing or 'none'}; shape mismatches {bad or 'none'}")
        self.model.load_state_dict({k: src[k] for k in dst}, strict=True)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(f"TextEncoder: ids and mask must be [N, L] of one shape, got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"TextEncoder: texts have {ids.shape[1]} tokens, more than "
                             f"text.max_length = {self.config.max_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"TextEncoder: token ids must be in [0, {self.config.vocab_size})")
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden, self.proj(hidden)
