"""Tokenizers: loading from local HF directories, the task tokens, the tiny trained ones."""

import pytest

from unigen.data.synthetic_text import sentence_of, synthetic_corpus
from unigen.model.config import UniGenConfig
from unigen.model.tokenizers import (
    DEFAULT_TASK_TOKENS,
    check_decoder_tokenizer,
    load_decoder_tokenizer,
    load_text_tokenizer,
    train_tiny_tokenizers,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_tiny_tokenizers(synthetic_corpus(), tmp_path_factory.mktemp("tok"),
                                 text_vocab_size=300, decoder_vocab_size=320)


def test_encoder_tokenizer_has_the_xlmr_layout(tiny):
    tok = load_text_tokenizer(tiny.text_dir)
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == tiny.text_vocab_size
    enc = tok(["le chat", "der Hund läuft schnell"], padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids[0][0] == 0 and ids[0][sum(mask[0]) - 1] == 2  # <s> ... </s>
    assert ids[0][-1] == 1 and mask[0][-1] == 0  # right-padded with <pad>
    # Unseen words still encode (pieces down to characters); nothing is dropped.
    assert tok.decode(tok("un chien noir")["input_ids"], skip_special_tokens=True) == "un chien noir"


def test_encoder_tokenizer_keeps_frequent_words_whole(tmp_path):
    """A small corpus of few distinct words must not be cut into letters (captions would then
    overrun the encoder's length limit)."""
    corpus = [sentence_of(lang, (i, j, k)) for lang in ("en", "fr", "de")
              for i in range(5) for j in range(6) for k in range(4)] * 20
    tok = load_text_tokenizer(train_tiny_tokenizers(corpus, tmp_path).text_dir)
    words = sentence_of("en", (1, 2, 3)).split()
    pieces = tok.convert_ids_to_tokens(tok(" ".join(words), add_special_tokens=False)["input_ids"])
    assert len(pieces) == len(words), pieces


def test_decoder_tokenizer_round_trips_and_has_task_tokens(tiny):
    tok = load_decoder_tokenizer(tiny.decoder_dir)
    V = tiny.decoder_vocab_size
    assert [tok.convert_tokens_to_ids(t) for t in DEFAULT_TASK_TOKENS] == [V, V + 1, V + 2, V + 3]
    assert len(tok) == V + 4 and tok.pad_token_id == tok.eos_token_id
    text = sentence_of("en", (1, 2, 3)) + " ?!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < V  # byte-level: any text, no task-token ids
    # Task tokens are never split and never produced from ordinary text.
    assert tok("[cap]", add_special_tokens=False)["input_ids"] == [V + 1]
    assert tok.decode(tok("Grüße 猫", add_special_tokens=False)["input_ids"]) == "Grüße 猫"


def test_check_decoder_tokenizer(tiny):
    tok = load_decoder_tokenizer(tiny.decoder_dir)
    cfg = UniGenConfig.tiny()
    cfg.decoder.vocab_size = tiny.decoder_vocab_size
    check_decoder_tokenizer(tok, cfg)
    cfg.decoder.vocab_size = tiny.decoder_vocab_size + 1
    with pytest.raises(ValueError, match=r"task token '\[trans\]' has id"):
        check_decoder_tokenizer(tok, cfg)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="texts is empty"):
        train_tiny_tokenizers(["", "  "], tmp_path)
    with pytest.raises(ValueError, match="decoder_vocab_size"):
        train_tiny_tokenizers(["a b"], tmp_path, decoder_vocab_size=10)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_text_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="lang"):
        sentence_of("xx", (0, 0, 0))
