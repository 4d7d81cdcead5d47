import pytest
import torch

from unigen.tokenization import synthetic_corpus, train_tiny_tokenizers


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The model tests use tiny tensors: intra-op threads only add synchronisation, and on a
    # loaded 2-core machine OpenMP's spin-waiting workers make each op up to ~50x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    """Tiny encoder/decoder tokenizers trained on generated text (shared by the model tests)."""
    return train_tiny_tokenizers(synthetic_corpus(), tmp_path_factory.mktemp("tok"),
                                 text_vocab_size=300, decoder_vocab_size=300)
