import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread):
    """Every training-core test runs on one intra-op thread (tests/conftest.py says why)."""
