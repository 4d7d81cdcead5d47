"""Argument helpers shared by the ops: validation (every public op fails loudly with the
argument's name) and the choice of 32- or 64-bit element offsets for the Triton kernels."""

import torch


def check_tensor(x, name: str, *, op: str, ndim=None, dtypes=None, device=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")
    if device is not None and x.device != device:
        raise ValueError(f"{op}: {name} is on {x.device} but the other inputs are on {device}")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def needs_wide_index(*tensors) -> bool:
    """Whether a kernel addressing these tensors needs 64-bit element offsets: some tensor's
    largest offset (strides included: a view into a packed qkv tensor reaches past its own
    numel) is 2^31 - 1 or more. Below that the kernels use 32-bit offsets, whose address tiles
    cost half the registers (on sm_90 the 64-bit ones made kernels spill)."""
    return any(sum((n - 1) * st for n, st in zip(x.shape, x.stride())) >= 2**31 - 1
               for x in tensors if x.numel())


def check_saved_storage(x, name: str, *, op: str):
    """Refuse, with the cause, a tensor saved for backward whose memory was freed since forward.

    FSDP2 frees an unsharded parameter's storage after its module's forward (resharding) and
    all-gathers it back in the module's pre-backward hook. That hook is attached to the tensors
    of the module's output; where FSDP2 cannot see them (torch < 2.13 does not look inside a
    plain dataclass) the op's backward would run on the freed storage: an opaque ``setStorage``
    error on CPU, a read of freed memory on a GPU. A check of the storage's size costs no sync.
    """
    # plain tensors and parameters (FSDP2's unsharded ones); not the fake or functional tensors
    # of a trace, whose storage is not real
    if type(x) not in (torch.Tensor, torch.nn.Parameter) or not x.numel():
        return
    extent = x.storage_offset() + sum((n - 1) * st for n, st in zip(x.shape, x.stride())) + 1
    if x.untyped_storage().nbytes() < extent * x.element_size():
        raise RuntimeError(
            f"{op}: the {name} saved for backward was freed after the forward (its storage holds "
            f"{x.untyped_storage().nbytes()} bytes, {extent * x.element_size()} needed). Under FSDP2 "
            f"the module owning it was resharded and its pre-backward all-gather has not run: FSDP2 "
            f"attaches that hook to the tensors of the module's output, so return the loss in a "
            f"tensor, tuple, dict or a dataclass registered with torch.utils._pytree.register_dataclass "
            f"(torch < 2.13 does not look inside other dataclasses), or shard that module with "
            f"reshard_after_forward=False.")


# ---------------------------------------------------------------------------------------------
# Non-finite values: one policy for every op (docs/architecture.md, "Non-finite inputs")
# ---------------------------------------------------------------------------------------------


def resolve_validate(validate, device: torch.device, *, op: str) -> bool:
    """``validate=None`` checks values where a check is free: on CPU tensors (a host read costs
    nothing there). On a GPU a check is a reduction plus a device-side assertion (a host read
    would sync), so it runs only when asked for with ``validate=True``."""
    if validate is None:
        return device.type == "cpu"
    if not isinstance(validate, bool):
        raise TypeError(f"{op}: validate must be None, True or False, got {validate!r}")
    return validate


def check_finite_result(finite, *, op: str, diagnose):
    """Raise, naming the argument, when ``finite`` (a 0-d bool tensor: the op's result is finite)
    is False.

    Eager CPU: a ``ValueError`` whose message ``diagnose()`` writes (it runs only on failure, so
    finding the culprit costs nothing on the good path). CUDA, or inside torch.compile (where a
    host read would sync or break the graph): ``torch._assert_async`` with a generic message; it
    surfaces at the next synchronisation and leaves the CUDA context unusable, as an out-of-range
    index would.
    """
    if finite.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(finite, f"{op}: non-finite values (nan or inf) in the inputs or the result")
        return
    if not bool(finite):
        raise ValueError(diagnose())


def name_non_finite(op: str, named, otherwise: str) -> str:
    """The message naming the first of ``named`` [(name, tensor or None), ...] that holds a
    non-finite value, else ``otherwise``."""
    for name, x in named:
        if x is not None and x.numel() and not bool(torch.isfinite(x).all()):
            return f"{op}: {name} contains non-finite values (nan or inf)"
    return f"{op}: {otherwise}"
