"""The package's version, and the line every entry point prints for ``--version``."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def version_line(prog: str) -> str:
    """``python -m unigen.train 0.1.0 (unigen at <path>, torch 2.13.0+cpu, Python 3.11.9)``:
    the program, then what a bug report needs to place the run (where the package was imported
    from: a checkout or an installed wheel)."""
    import os

    import unigen

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:  # the version must print even where torch is broken or absent
        torch_version = "not installed"
    where = os.path.dirname(os.path.abspath(unigen.__file__))
    return (f"{prog} {__version__} (unigen at {where}, torch {torch_version}, "
            f"Python {platform.python_version()})")


def add_version_argument(parser, prog: str) -> None:
    """``--version`` on an argparse entry point: the line :func:`version_line` gives, printed
    as is (argparse's own version action re-wraps it to the terminal's width)."""
    import argparse

    class PrintVersion(argparse.Action):
        def __init__(self, option_strings, dest, **kwargs):
            super().__init__(option_strings, dest, nargs=0,
                             help="print the version and exit")

        def __call__(self, parser, namespace, values, option_string=None):
            print(version_line(prog))
            parser.exit()

    parser.add_argument("--version", action=PrintVersion)
