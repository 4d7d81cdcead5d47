import pytest

from unigen.data.synthetic_text import synthetic_corpus
from unigen.model.tokenizers import train_tiny_tokenizers


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread):
    """Every model test runs on one intra-op thread (tests/conftest.py says why)."""


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Tiny encoder/decoder tokenizers trained on generated text (shared by the model tests)."""
    return train_tiny_tokenizers(synthetic_corpus(), tmp_path_factory.mktemp("tok"),
                                 text_vocab_size=300, decoder_vocab_size=300)
