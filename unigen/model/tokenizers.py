"""Tokenizers of UniGen: the XLM-R-style encoder tokenizer (SentencePiece pieces) and the
GPT-2-style decoder tokenizer (byte-level BPE) with the four task tokens (paper §3.3).

``load_text_tokenizer`` / ``load_decoder_tokenizer`` read local Hugging Face directories (nothing is
downloaded). ``train_tiny_tokenizers`` trains small tokenizers of the same two kinds on given text
and saves them in HF format: tests, the demo and the synthetic data pipeline use them, since no
pre-trained tokenizer can be fetched there (the text they train on: :mod:`unigen.data.synthetic_text`).
Tokenising training samples per task is the data layer's :mod:`unigen.data.task_tokenizer`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

DEFAULT_TASK_TOKENS = ("[trans]", "[cap]", "[qus]", "[match]")
# XLM-R's special tokens, in its id order (<s>=0, <pad>=1, </s>=2, <unk>=3), then <mask>.
XLMR_SPECIAL = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
GPT2_EOS = "<|endoftext|>"


def _need_dir(directory, op: str) -> str:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{op}: {directory!r} is not a directory")
    return directory


def load_text_tokenizer(directory: str | os.PathLike):
    """The encoder tokenizer (xlm-roberta-base or a tiny one) from a local HF directory."""
    from transformers import AutoTokenizer

    directory = _need_dir(directory, "load_text_tokenizer")
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tok.pad_token_id is None:
        raise ValueError(f"load_text_tokenizer: the tokenizer in {directory!r} has no pad token")
    return tok


def add_task_tokens(tokenizer, task_tokens: Sequence[str] = DEFAULT_TASK_TOKENS) -> None:
    """Append the task tokens (as special tokens, never split) when the tokenizer lacks them."""
    missing = [t for t in task_tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": list(task_tokens)})


def load_decoder_tokenizer(directory: str | os.PathLike,
                           task_tokens: Sequence[str] = DEFAULT_TASK_TOKENS):
    """The decoder tokenizer (gpt2 or a tiny one) from a local HF directory, with the task tokens
    appended after the base vocabulary (ids V..V+3) and pad = eos (GPT-2 has no pad token)."""
    from transformers import AutoTokenizer

    directory = _need_dir(directory, "load_decoder_tokenizer")
    tok = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if tok.eos_token_id is None:
        raise ValueError(f"load_decoder_tokenizer: the tokenizer in {directory!r} has no eos token")
    add_task_tokens(tok, task_tokens)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def check_decoder_tokenizer(tokenizer, config) -> None:
    """Raise unless ``tokenizer`` matches the model: base vocabulary = decoder.vocab_size and the
    task tokens at ids vocab_size + i, in TASK_NAMES order."""
    V = config.decoder.vocab_size
    vocab = tokenizer.get_vocab()
    for i, t in enumerate(config.tasks.task_tokens):
        if vocab.get(t) != V + i:
            raise ValueError(
                f"decoder tokenizer: task token {t!r} has id {vocab.get(t)}, but the model expects "
                f"{V + i} (decoder.vocab_size + {i}); load it with load_decoder_tokenizer and make "
                f"decoder.vocab_size equal its base vocabulary")
    if len(tokenizer) != V + len(config.tasks.task_tokens):
        raise ValueError(f"decoder tokenizer has {len(tokenizer)} tokens, the model "
                         f"{V + len(config.tasks.task_tokens)} (vocab_size + task tokens)")
    if tokenizer.eos_token_id is None:
        raise ValueError("decoder tokenizer has no eos token")


@dataclass
class TinyTokenizers:
    """What :func:`train_tiny_tokenizers` wrote."""

    text_dir: str
    decoder_dir: str
    text_vocab_size: int
    """Size of the encoder vocabulary (TextEncoderConfig.vocab_size)."""
    decoder_vocab_size: int
    """Base size of the decoder vocabulary, task tokens excluded (DecoderConfig.vocab_size)."""

    def load(self, task_tokens: Sequence[str] = DEFAULT_TASK_TOKENS):
        return load_text_tokenizer(self.text_dir), load_decoder_tokenizer(self.decoder_dir, task_tokens)


def train_tiny_tokenizers(texts: Iterable[str], out_dir: str | os.PathLike, *,
                          text_vocab_size: int = 500, decoder_vocab_size: int = 500,
                          task_tokens: Sequence[str] = DEFAULT_TASK_TOKENS) -> TinyTokenizers:
    """Train an encoder tokenizer in XLM-R's layout (SentencePiece ``▁`` pieces, its special
    tokens and ids) and a byte-level BPE (GPT-2 layout) decoder tokenizer on ``texts``; save both
    under ``out_dir`` in HF format (``out_dir/text``, ``out_dir/decoder``; the decoder one
    includes the task tokens).

    The encoder's pieces are learned by BPE merges, not by XLM-R's unigram LM: on a corpus of a
    few hundred distinct words the unigram trainers (``tokenizers``' and ``sentencepiece``'s
    alike) stop far below the asked vocabulary and split the commonest words into letters
    ("a yellow diamond in the middle" became 16 pieces, "▁", "y", "e", "llo", "w", ...), which
    pushed captions past the encoder's length limit. BPE keeps every frequent word whole; unseen
    words still encode, down to single characters."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_tiny_tokenizers: texts is empty")
    for name, v in (("text_vocab_size", text_vocab_size), ("decoder_vocab_size", decoder_vocab_size)):
        if not isinstance(v, int) or v < 300:
            # byte-level BPE needs its 256-symbol alphabet plus room for merges
            raise ValueError(f"train_tiny_tokenizers: {name} must be an int >= 300, got {v!r}")
    out_dir = os.fspath(out_dir)
    text_dir, dec_dir = os.path.join(out_dir, "text"), os.path.join(out_dir, "decoder")

    # Encoder: merges over Metaspace ("▁word") pieces, as SentencePiece/XLM-R segment text.
    enc = Tokenizer(models.BPE(unk_token="<unk>"))
    enc.normalizer = normalizers.NFKC()
    enc.pre_tokenizer = pre_tokenizers.Metaspace()
    enc.decoder = decoders.Metaspace()
    # show_progress off: written to a log file, the trainers' bars are only blank lines
    enc.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=text_vocab_size, special_tokens=list(XLMR_SPECIAL), show_progress=False))
    bos, eos = enc.token_to_id("<s>"), enc.token_to_id("</s>")
    enc.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", bos), ("</s>", eos)])
    text_tok = PreTrainedTokenizerFast(
        tokenizer_object=enc, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
        model_max_length=512)
    text_tok.save_pretrained(text_dir)

    # Decoder: byte-level BPE with GPT-2's single special token; task tokens appended after.
    dec = Tokenizer(models.BPE())
    dec.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    dec.decoder = decoders.ByteLevel()
    dec.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=decoder_vocab_size, special_tokens=[GPT2_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = dec.get_vocab_size()
    dec_tok = PreTrainedTokenizerFast(tokenizer_object=dec, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                                      unk_token=GPT2_EOS, model_max_length=1024)
    add_task_tokens(dec_tok, task_tokens)
    dec_tok.pad_token = dec_tok.eos_token
    dec_tok.save_pretrained(dec_dir)
    return TinyTokenizers(text_dir=text_dir, decoder_dir=dec_dir,
                          text_vocab_size=enc.get_vocab_size(), decoder_vocab_size=base)
