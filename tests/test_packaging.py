"""The wheel: its metadata (description from the README, licence, URLs, classifiers), the
presets inside it, and an installed wheel that finds them from any folder."""

import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # the pure-Python wheel (no C++ build: the metadata and the files are what is tested here)
    env = dict(os.environ, UNIGEN_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation",
                           "--no-deps", "-q", "-w", str(out), ROOT], capture_output=True,
                          text=True, timeout=600, env=env, cwd=str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return path


def test_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        names = z.namelist()
    head, _, body = meta.partition("\n\n")
    assert "License-Expression: Apache-2.0" in head or "License: Apache-2.0" in head
    assert "Project-URL: Paper, https://doi.org/10.1145/3655497.3655509" in head
    assert "Classifier: Topic :: Scientific/Engineering :: Artificial Intelligence" in head
    assert "Description-Content-Type: text/markdown" in head
    assert body.startswith("# UniGen")  # the README
    assert any(n.endswith("licenses/LICENSE") for n in names)
    for preset in ("unigen/configs/tiny.yaml", "unigen/configs/paper.yaml",
                   "unigen/configs/ablations/no_ccqa.yaml"):
        assert preset in names


def test_an_installed_wheel_finds_the_presets_from_any_folder(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), wheel], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))
    for config in ("configs/tiny.yaml", "tiny", "ablations/no_ccqa"):
        proc = subprocess.run([sys.executable, "-m", "unigen.train", "--config", config,
                               "--print-config"], capture_output=True, text=True, timeout=120,
                              env=env, cwd=str(elsewhere))
        assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([sys.executable, "-c", "import unigen, sys; print(unigen.__file__)"],
                          capture_output=True, text=True, env=env, cwd=str(elsewhere))
    assert proc.stdout.startswith(str(site))  # the wheel's copy, not the checkout's
