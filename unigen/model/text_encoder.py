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

        from unigen.model.hf_versions import check_transformers_version

        check_transformers_version()
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

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, *, check_ids: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """check_ids: check the ids' range here (a device read on CUDA); the training step
        turns it off, its batch having been validated on the host."""
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(f"TextEncoder: ids and mask must be [N, L] of one shape, got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.shape[1] > self.config.max_length:
            raise ValueError(f"TextEncoder: texts have {ids.shape[1]} tokens, more than "
                             f"text.max_length = {self.config.max_length}")
        if check_ids and ids.numel() and (int(ids.min()) < 0
                                          or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"TextEncoder: token ids must be in [0, {self.config.vocab_size})")
        hidden = self.model(input_ids=ids, attention_mask=self._attention_mask(mask)).last_hidden_state
        return hidden, self.proj(hidden)

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The 4-D mask transformers would build from the padding mask, built here: given the
        2-D mask, transformers first asks ``mask.all()`` (a device read) to drop it when
        nothing is padded; a 4-D mask it takes as is."""
        keep = mask.bool()[:, None, None, :]  # [N, 1, 1, L]: every query sees the real keys
        if self.model.config._attn_implementation == "eager":  # eager adds the mask to scores
            return torch.zeros(keep.shape, dtype=self.proj.weight.dtype,
                               device=mask.device).masked_fill(~keep, torch.finfo(
                                   self.proj.weight.dtype).min)
        return keep
