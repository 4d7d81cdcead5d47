"""Generation backends, by name. Each is imported only when asked for, so a missing optional
dependency (transformers, vLLM) only matters to the backend that needs it."""

from __future__ import annotations

import importlib

from ..errors import UsageError
from .base import Backend, Failure, Generation, GenerationSettings

# name -> (module, class); modules are imported lazily by make_backend.
BACKENDS = {
    "rule": ("unigen.questioner.backends.rule", "RuleBackend"),
    "hf": ("unigen.questioner.backends.hf", "HFBackend"),
    "vllm": ("unigen.questioner.backends.vllm", "VLLMBackend"),
    "http": ("unigen.questioner.backends.http", "HTTPBackend"),
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    module, cls = BACKENDS[name]
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, **kwargs) -> Backend:
    return backend_class(name)(**kwargs)


__all__ = ["BACKENDS", "Backend", "Failure", "Generation", "GenerationSettings", "backend_class", "make_backend"]
