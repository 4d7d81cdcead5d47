"""Fixtures of the kernel tests. ``run_sm90_compile``: compile an op's Triton kernels down to an
sm_90 cubin without a GPU (``gpu_compile_check.py`` beside this file, in a subprocess because
TRITON_INTERPRET=1 replaces @triton.jit in the test process).
"""

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
