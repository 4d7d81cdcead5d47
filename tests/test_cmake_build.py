"""CMakeLists.txt builds the op library against libtorch and its C++ tests pass under ctest."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None and not (Path(sys.executable).parent / "cmake").exists(),
                    reason="cmake not installed")
def test_cmake_build_and_ctest(tmp_path):
    bin_dir = Path(sys.executable).parent
    cmake = shutil.which("cmake") or str(bin_dir / "cmake")
    ctest = shutil.which("ctest") or str(bin_dir / "ctest")
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL="2")
    configure = subprocess.run([cmake, "-S", str(ROOT), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release",
                                f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                               capture_output=True, text=True, env=env, timeout=300)
    if configure.returncode and torch.version.cuda and "cannot find the CUDA" in configure.stderr:
        # libtorch's CMake package of a CUDA build of torch (PyPI's Linux wheels) finds the CUDA
        # toolkit's libraries before anything links against it, whatever the project compiles
        pytest.skip(f"torch {torch.__version__} is a CUDA build and CMake finds no CUDA toolkit here")
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    build = subprocess.run([cmake, "--build", str(tmp_path), "-j", "2"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([ctest, "--output-on-failure"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "100% tests passed" in run.stdout
