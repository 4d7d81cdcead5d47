import importlib.util
import os
import sys

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors (`make test`
# sets this too). With one, they compile for it: the `gpu` tests need the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny-model tests: their ops are far too small to gain
    from threads, and on a loaded 2-core machine OpenMP's spin-waiting workers make each op
    several (up to ~50) times slower. Folders opt in with an autouse fixture that requests it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def load_file_module():
    """Imports a script of the repository that is not on the tests' import path
    (``benchmarks/*.py``) from its file, under its stem (registered in ``sys.modules``, which
    its dataclasses look their module up in)."""
    def load(path):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module
    return load
