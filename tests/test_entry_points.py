"""What every ``python -m`` entry point shares: ``--version`` (the package's version, exit 0,
before any other argument is looked at) and ``--help`` naming it."""

import importlib
import subprocess
import sys

import pytest

import unigen

# (module whose main() takes argv, the name it calls itself)
ENTRY_POINTS = [
    ("unigen.train", "python -m unigen.train"),
    ("unigen.iglue.finetune", "python -m unigen.finetune"),
    ("unigen.iglue.evaluate", "python -m unigen.evaluate"),
    ("unigen.questioner.cli", "python -m unigen.questioner"),
    ("unigen.demo.pretrain", "python -m unigen.demo"),
    ("unigen.demo.ablations", "python -m unigen.demo.ablations"),
    ("unigen.demo.fused_loss", "python -m unigen.demo.fused_loss"),
    ("unigen.iglue.fewshot", "python -m unigen.iglue.fewshot"),
    ("unigen.iglue.table", "python -m unigen.iglue.table"),
    ("unigen.scoring.world", "python -m unigen.scoring.world"),
    ("unigen.data.check", "python -m unigen.data.check"),
    ("unigen.data.prepare", "python -m unigen.data.prepare"),
    ("unigen.data.synthetic_world", "python -m unigen.data.synthetic_world"),
    ("unigen.training.export", "python -m unigen.training.export"),
]


def _version_of(main, argv, capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as e:  # the argparse entry points exit from the action
        status = e.code
    return status or 0, capsys.readouterr().out


@pytest.mark.parametrize("module,prog", ENTRY_POINTS, ids=[m for m, _ in ENTRY_POINTS])
def test_version_everywhere(module, prog, capsys):
    main = importlib.import_module(module).main
    # also where required arguments are missing: --version needs none
    status, out = _version_of(main, ["--version"], capsys)
    assert status == 0
    assert out.startswith(f"{prog} {unigen.__version__} (unigen at ") and "torch " in out
    assert out.count("\n") == 1


def test_help_lists_version(capsys):
    from unigen.train import main

    assert main(["--help"]) == 0
    assert "[--version]" in capsys.readouterr().out.splitlines()[0]


def test_version_from_the_command_line():
    proc = subprocess.run([sys.executable, "-m", "unigen.questioner", "--version"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("python -m unigen.questioner 0.")
