"""Fixtures of the kernel tests. ``run_sm90_compile``: compile an op's Triton kernels down to an
sm_90 cubin without a GPU (``gpu_compile_check.py`` beside this file, in a subprocess because
TRITON_INTERPRET=1 replaces @triton.jit in the test process). ``host_ops``: the PyTorch ops
that would launch device work around an op's kernels. ``no_host_sync``: a context in which any
CUDA host-device synchronisation raises (GPU tests).
"""

import contextlib
import os
import subprocess
import sys

import pytest

GPU_COMPILE_CHECK = os.path.join(os.path.dirname(__file__), "gpu_compile_check.py")


def _run_sm90_compile(args: list[str], cache_dir) -> str:
    """Run gpu_compile_check.py with ``args`` (op, dtype[, dim]); skip where impossible.
    Returns its report (one line per kernel)."""
    import triton

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("triton's bundled ptxas is missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # a real compile every time, not a cache hit
    proc = subprocess.run([sys.executable, GPU_COMPILE_CHECK, *args], env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0 and "compiled for sm_90" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-4000:])
    return proc.stdout


@pytest.fixture
def run_sm90_compile():
    return _run_sm90_compile


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
