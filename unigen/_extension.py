"""Loads the optional C++ op library ``unigen._C``.

Importing it registers the ``torch.ops.unigen.*`` C++ ops. It is optional: when it was not
built (no compiler, a failed build, ``UNIGEN_NO_EXT=1``) every op uses its Python path.
"""

import importlib
import os

_loaded = None
_error = None


def cpp_ops_available() -> bool:
    """True when ``unigen._C`` is built and its ops are registered."""
    global _loaded, _error
    if _loaded is None:
        if os.environ.get("UNIGEN_NO_EXT") == "1":
            _loaded, _error = False, "disabled by UNIGEN_NO_EXT=1"
        else:
            try:
                import torch  # noqa: F401  (loads libc10/libtorch, which unigen._C links against)

                importlib.import_module("unigen._C")
                _loaded = True
            except ImportError as exc:
                _loaded, _error = False, str(exc)
    return _loaded


def cpp_ops_error() -> str | None:
    """Why the C++ ops are unavailable (None when they are loaded)."""
    cpp_ops_available()
    return _error
