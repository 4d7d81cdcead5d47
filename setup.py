"""Build and install UniGen.

The C++ op library ``unigen._C`` is optional: when torch's C++ toolchain is missing or the
build fails, the package still installs and every op falls back to its Python path.
CUDA sources in ``csrc/cuda`` are compiled only when torch is a CUDA build and nvcc is present.
Install with ``pip install --no-build-isolation -e .`` so the extension is built against the
torch that is already installed (an isolated build would fetch another torch).
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("UNIGEN_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # torch missing: pure-Python install
        print(f"[unigen] torch not importable ({exc}); building without unigen._C", file=sys.stderr)
        return [], {}

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # No -std: torch's BuildExtension adds the standard its headers need (C++17 up to torch 2.13,
    # C++20 from 2.14, whose ATen refuses anything older).
    extra_compile = {"cxx": ["-O3", "-fopenmp"]}
    extra_link = ["-fopenmp"]
    ext_cls = cpp_extension.CppExtension
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if cuda_sources and torch.version.cuda and cpp_extension.CUDA_HOME:
        ext_cls = cpp_extension.CUDAExtension
        sources += cuda_sources
        extra_compile["nvcc"] = ["-O3"]
    ext = ext_cls(
        "unigen._C",
        sources,
        extra_compile_args=extra_compile,
        extra_link_args=extra_link,
    )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Never let a failed extension build break the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:
                print(f"[unigen] building unigen._C failed ({exc}); ops use their Python paths",
                      file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"[unigen] building {ext.name} failed ({exc}); ops use their Python paths",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# kernels/<folder> -> unigen.kernels.<folder> (nested folders follow their parent's mapping)
KERNEL_PACKAGES = {f"unigen.kernels.{name}": os.path.join("kernels", *name.split("."))
                   for name in find_packages("kernels")}

# The config presets (configs/*.yaml) ship as package data, unigen/configs/ in the wheel, so
# `--config tiny` / `--config configs/tiny.yaml` work from any folder once installed
# (unigen/presets.py looks there, then in a checkout's configs/). Data only: no __init__.py.
PRESET_PACKAGES = {"unigen.configs": "configs", "unigen.configs.ablations": "configs/ablations"}


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


# One version: the package's own (unigen/version.py), read without importing the package.
VERSION = re.search(r'^__version__ = "([^"]+)"', _read("unigen", "version.py"), re.M).group(1)

setup(
    name="unigen",
    version=VERSION,
    description="UniGen: a fast training core for multilingual multimodal generative pre-training",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    project_urls={
        "Paper": "https://doi.org/10.1145/3655497.3655509",
    },
    keywords=["multilingual", "multimodal", "vision-language", "pre-training", "triton",
              "cross-entropy", "contrastive learning", "flash attention"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Programming Language :: C++",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    # Each folder of `kernels/` installs as a subpackage of `unigen.kernels` (whose public surface
    # is unigen/kernels/__init__.py); `kernels/` itself has no __init__.py and is never a top-level
    # `kernels` package (PyPI's `kernels`, which transformers imports, owns that name).
    packages=find_packages(include=["unigen", "unigen.*"]) + list(KERNEL_PACKAGES)
    + list(PRESET_PACKAGES),
    package_dir={"unigen": "unigen", **KERNEL_PACKAGES, **PRESET_PACKAGES},
    package_data={name: ["*.yaml"] for name in PRESET_PACKAGES},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=["torch>=2.11", "numpy", "safetensors", "pyyaml", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "triton>=3.6", "ninja"],
        "model": ["transformers>=5.6,<6", "tokenizers", "sentencepiece", "pillow"],
        # The data pipeline decodes with PIL; DALI (GPU JPEG decoding) is optional, one wheel
        # per CUDA major version: pick the extra of the machine's CUDA.
        "data": ["pillow", "pyarrow"],
        "dali-cuda12": ["nvidia-dali-cuda120==2.4.0"],
        "dali-cuda13": ["nvidia-dali-cuda130==2.4.0"],
        "compare": ["liger-kernel", "cut-cross-entropy", "flash-attn", "open_clip_torch"],
    },
)
