"""Fixtures of the kernel tests. ``run_sm90_compile``: compile Triton kernels down to an sm_90 cubin without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels as Python and forgives what the GPU compiler
rejects; this pushes them through Triton's real NVIDIA pipeline (the ptxas bundled in the
triton wheel). It runs in a subprocess because TRITON_INTERPRET=1 replaces @triton.jit here.
"""

import os
import subprocess
import sys

import pytest


def _run_sm90_compile(script: str, args: list[str], cache_dir) -> None:
    """Run ``script`` (which prints "compiled for sm_90") with ``args``; skip where impossible."""
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
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0 and "compiled for sm_90" in proc.stdout, proc.stderr[-4000:]


@pytest.fixture
def run_sm90_compile():
    return _run_sm90_compile
