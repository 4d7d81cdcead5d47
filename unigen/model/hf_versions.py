"""The transformers releases the model code supports, checked where it first builds a
transformers module.

The image encoder runs CLIP's vision tower layer by layer through the flattened layout that
transformers 5.6 introduced (``CLIPVisionModel.embeddings`` / ``.encoder.layers``, a layer
called as ``layer(h, mask)``); 5.0-5.5 and 4.x nest the tower under ``vision_model`` (and the
state-dict keys with it). So the floor is 5.6, the release the oldest-version check runs on
(``make test-floor``); the next major is excluded until it is tested.
"""

from __future__ import annotations

TRANSFORMERS_REQUIREMENT = "transformers>=5.6,<6"
"""What setup.py's ``model`` extra and requirements/test.in declare (a test keeps them equal)."""

_MIN, _MAX_MAJOR = (5, 6), 6


def _installed_version() -> str:
    import transformers

    return transformers.__version__


def check_transformers_version(version: str | None = None) -> None:
    """Raise ImportError naming the installed and the supported versions when transformers
    is outside :data:`TRANSFORMERS_REQUIREMENT`."""
    if version is None:
        version = _installed_version()
    try:
        parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        parts = ()
    if len(parts) != 2:
        raise ImportError(f"UniGen: cannot read the transformers version {version!r}; the model "
                          f"needs {TRANSFORMERS_REQUIREMENT}")
    if parts < _MIN or parts[0] >= _MAX_MAJOR:
        raise ImportError(f"UniGen: transformers {version} is installed, the model needs "
                          f"{TRANSFORMERS_REQUIREMENT} (it drives CLIP's vision tower through "
                          f"transformers 5's module layout): pip install "
                          f"'{TRANSFORMERS_REQUIREMENT}'")
