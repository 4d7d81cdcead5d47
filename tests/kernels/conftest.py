"""Fixtures of the kernel tests. ``host_ops``: the PyTorch ops that would launch device work
around an op's kernels. ``no_host_sync``: a context in which any CUDA host-device
synchronisation raises (GPU tests). (The sm_90 build of the kernels without a GPU is
``benchmarks/compile_check.py``; ``test_compile_check.py`` runs it.)
"""

import contextlib

import pytest

# Top-level ops that launch no device work: allocations, views, and casts to the dtype a tensor
# has already (an ``aten::to`` that copies shows an ``aten::_to_copy`` child and is counted).
_FREE_OPS = {"aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided",
             "aten::reshape", "aten::view", "aten::unbind", "aten::select", "aten::slice",
             "aten::squeeze", "aten::unsqueeze", "aten::detach", "aten::alias", "aten::as_strided",
             "aten::contiguous", "aten::lift_fresh", "aten::to"}


class _NoLaunch:
    """Stands in for a @triton.jit kernel: ``kernel[grid](...)`` does nothing, or calls
    ``on_launch(*args)`` (e.g. to fill a flag buffer the host code reads)."""

    def __init__(self, on_launch=None):
        self.on_launch = on_launch

    def __getitem__(self, grid):
        return self.on_launch or (lambda *args, **kwargs: None)


def _host_ops(monkeypatch, module, kernels, fn):
    """Runs ``fn`` with ``module``'s Triton kernels named in ``kernels`` replaced by launches
    that do nothing (name -> None) or call a function with the launch's arguments, and returns
    the names of the top-level PyTorch ops it issued that launch device work, so a test can
    bound what the host adds to the kernels: at training sizes such ops cost more host time than
    the GPU spends in the kernels."""
    from torch.profiler import ProfilerActivity, profile

    for name, on_launch in kernels.items():
        monkeypatch.setattr(module, name, _NoLaunch(on_launch))
    fn()  # warm-up: first-call caches stay out of the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()
            if e.name.startswith("aten::")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
            and not (e.name in _FREE_OPS and (e.name != "aten::to" or not e.cpu_children))]


@pytest.fixture
def host_ops(monkeypatch):
    return lambda module, kernels, fn: _host_ops(monkeypatch, module, kernels, fn)


@contextlib.contextmanager
def _no_host_sync():
    """Every CUDA call that synchronises the host with the device raises inside (``.item()``,
    ``nonzero``, a blocking copy to the host, ...): the ops promise none on their GPU path."""
    import torch

    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


@pytest.fixture
def no_host_sync():
    return _no_host_sync
