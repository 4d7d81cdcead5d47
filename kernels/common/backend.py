"""Backend selection shared by every op in :mod:`unigen.kernels`.

``backend`` is one of:

- ``"auto"``: Triton for CUDA tensors, otherwise the C++ op when built, else the PyTorch path;
- ``"triton"``: the Triton kernels (on CPU tensors only under ``TRITON_INTERPRET=1``);
- ``"torch"``: the readable PyTorch reference;
- ``"cpp"``: the ``unigen._C`` op (raises when it was not built).
"""

import importlib.util
import os

import torch

from unigen._extension import cpp_ops_available, cpp_ops_error

BACKENDS = ("auto", "triton", "torch", "cpp")


# Looked up once at import: a plain constant is also what torch.compile traces best.
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_AVAILABLE


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, *, op: str, has_cpp: bool = True) -> str:
    """Turn a user ``backend`` into the concrete one, or raise a clear error."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and has_cpp and cpp_ops_available():
            return "cpp"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"{op}: backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 to run the "
                f"kernels on {device.type} tensors through Triton's interpreter"
            )
        return "triton"
    if backend == "cpp":
        if not has_cpp:
            raise RuntimeError(f"{op}: there is no C++ implementation of this op")
        if not cpp_ops_available():
            raise RuntimeError(f"{op}: backend='cpp' needs the unigen._C extension ({cpp_ops_error()})")
        if device.type != "cpu":
            raise RuntimeError(f"{op}: backend='cpp' runs on CPU tensors, got {device.type}")
    return backend
