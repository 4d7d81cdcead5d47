"""UniGen: unified generative pre-training for multilingual multimodal representation.

The fused ops live in :mod:`unigen.kernels`; the model (``UniGen``, ``UniGenConfig``) in
:mod:`unigen.model`. Heavy submodules are imported lazily so ``import unigen`` stays cheap.
"""

from unigen.version import __version__  # noqa: F401  (the package's version, one source)

_LAZY = {"UniGen": "unigen.model", "UniGenConfig": "unigen.model.config"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unigen' has no attribute {name!r}")
