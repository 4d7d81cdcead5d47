"""The config presets (``configs/*.yaml``) by name, from a checkout or from an installed wheel.

A checkout keeps them in ``configs/`` beside ``setup.py``; a wheel ships the same folder as
package data, ``unigen/configs/`` (setup.py maps it), so ``--config configs/tiny.yaml`` and
``--config tiny`` work from any folder once the package is installed, not only from the root
of a clone. A path that exists is always read as given: a preset is only the fallback for a
name that is not a file.
"""

from __future__ import annotations

import os

PRESETS_DIR = "configs"
_SUFFIXES = ("", ".yaml", ".yml", ".json")


def preset_dirs() -> list[str]:
    """Where presets are looked up: the installed package's ``unigen/configs/`` (a wheel), then
    the checkout's ``configs/`` (an editable install or ``PYTHONPATH=<checkout>``)."""
    package = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package)
    dirs = [os.path.join(package, PRESETS_DIR)]
    if os.path.isfile(os.path.join(checkout, "setup.py")):
        dirs.append(os.path.join(checkout, PRESETS_DIR))
    return [d for d in dirs if os.path.isdir(d)]


def preset_names() -> list[str]:
    """Every preset, as ``--config`` takes it: ``tiny``, ``paper``, ``ablations/no_ccqa``, ..."""
    names = set()
    for root in preset_dirs():
        for folder, _, files in os.walk(root):
            for f in files:
                if f.endswith((".yaml", ".yml", ".json")):
                    rel = os.path.relpath(os.path.join(folder, f), root)
                    names.add(os.path.splitext(rel)[0].replace(os.sep, "/"))
    return sorted(names)


def find_preset(name: str | os.PathLike) -> str | None:
    """The preset file ``name`` stands for — ``tiny``, ``tiny.yaml`` or ``configs/tiny.yaml``
    (a leading ``configs/`` is the checkout's folder name) — or None."""
    name = os.fspath(name).replace("\\", "/")
    if os.path.isabs(name):
        return None
    if name.startswith(PRESETS_DIR + "/"):
        name = name[len(PRESETS_DIR) + 1:]
    if not name or ".." in name.split("/"):
        return None
    for root in preset_dirs():
        for suffix in _SUFFIXES:
            path = os.path.join(root, *(name + suffix).split("/"))
            if os.path.isfile(path):
                return path
    return None
