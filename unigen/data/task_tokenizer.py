"""Token ids for every task: XLM-R-style encoder inputs, GPT-2-style English decoder targets.

Per paper §3.3 and §4.2 the multilingual text goes through XLM-R's SentencePiece tokenizer
(at most 40 tokens, with its ``<s> … </s>`` framing) and the English outputs through GPT-2's
byte-level BPE, ended by the end-of-text token so generation learns to stop. Both tokenizers
load from local directories (HF format); nothing is downloaded.

What each task feeds the encoder and what the decoder must generate:

========  =====================  ==================================================
task      encoder text           decoder target
========  =====================  ==================================================
trans     ``source_text``        ``target_text`` (the English sentence)
cap       — (image only)         ``caption``
qus       ``question``           ``answer``
match     ``caption``            ``"yes"`` (the trainer swaps in ``"no"`` for the
                                 hard negatives it mines; see ``match_target_ids``)
========  =====================  ==================================================

The task token (``[trans]`` …) is the model's business; it is not inserted here.
"""

from __future__ import annotations

import os

TASK_TEXT_FIELDS = {"trans": ("source_text", "target_text"), "cap": (None, "caption"),
                    "qus": ("question", "answer"), "match": ("caption", None)}
MATCH_WORDS = {True: "yes", False: "no"}


def _load_local(path: str, what: str):
    from transformers import AutoTokenizer

    if not path or not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: tokenizer directory {path!r} does not exist "
                                f"(tokenizers load from local directories only)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


class TaskTokenizer:
    """Adds ``encoder_ids`` and ``target_ids`` (lists of ints) to a task sample.

    Args:
        encoder_dir, decoder_dir: local HF tokenizer directories (XLM-R-like, GPT-2-like);
            or pass ready ``encoder``/``decoder`` tokenizer objects instead.
        max_encoder_len: encoder tokens incl. ``<s>``/``</s>`` (paper: 40).
        max_target_len: decoder target tokens incl. the end-of-text token.
    """

    def __init__(self, encoder_dir: str | None = None, decoder_dir: str | None = None, *,
                 encoder=None, decoder=None, max_encoder_len: int = 40,
                 max_target_len: int = 64):
        self.encoder = encoder if encoder is not None else _load_local(encoder_dir, "encoder_dir")
        self.decoder = decoder if decoder is not None else _load_local(decoder_dir, "decoder_dir")
        if max_encoder_len < 3 or max_target_len < 2:
            raise ValueError(f"max_encoder_len must be >= 3 and max_target_len >= 2, got "
                             f"{max_encoder_len}, {max_target_len}")
        self.max_encoder_len = max_encoder_len
        self.max_target_len = max_target_len
        if self.decoder.eos_token_id is None:
            raise ValueError("the decoder tokenizer has no end-of-text (eos) token")
        if self.encoder.pad_token_id is None:
            raise ValueError("the encoder tokenizer has no pad token")
        self.encoder_pad_id = self.encoder.pad_token_id
        self.eos_id = self.decoder.eos_token_id
        # GPT-2 has no pad token; its end-of-text token pads (the loss masks padding anyway)
        self.decoder_pad_id = (self.decoder.pad_token_id if self.decoder.pad_token_id is not None
                               else self.eos_id)

    def encode_encoder(self, text: str) -> list[int]:
        return list(self.encoder(text, truncation=True, max_length=self.max_encoder_len,
                                 add_special_tokens=True)["input_ids"])

    def encode_target(self, text: str) -> list[int]:
        # GPT-2 adds no special tokens; a target is its tokens then end-of-text
        ids = list(self.decoder(text, add_special_tokens=False)["input_ids"])
        return ids[: self.max_target_len - 1] + [self.eos_id]

    def match_target_ids(self, is_match: bool) -> list[int]:
        return self.encode_target(MATCH_WORDS[bool(is_match)])

    def __call__(self, sample: dict) -> dict:
        task = sample.get("task")
        if task not in TASK_TEXT_FIELDS:
            raise ValueError(f"sample has task {task!r}; expected one of "
                             f"{sorted(TASK_TEXT_FIELDS)}")
        enc_field, tgt_field = TASK_TEXT_FIELDS[task]
        out = dict(sample)
        out["encoder_ids"] = self.encode_encoder(sample[enc_field]) if enc_field else []
        out["target_ids"] = (self.encode_target(sample[tgt_field]) if tgt_field
                             else self.match_target_ids(True))
        return out
