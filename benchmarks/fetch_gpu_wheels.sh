#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git; name it in the device call's `carry`) the packages the
# GPU check may need there (Python 3.12, torch 2.11 + CUDA 13, no network): the benchmark
# runner, and the public alternatives the benchmarks compare against. Run on a machine with
# PyPI access. benchmarks/gpu_check.sh installs only those whose modules the GPU machine lacks.
#
# - pure-Python wheels: pytest and pytest-benchmark, Liger-Kernel, Cut Cross-Entropy, open_clip
#   (+ ftfy), Inf-CL;
# - xformers 0.0.35 (3 MB): PyPI's newest, built for torch 2.10 + CUDA 12.8 on PyTorch's stable
#   C ABI (one wheel for later torch versions), its _C.so linked against libcudart.so.12; the GPU
#   machine's torch is 2.11 + CUDA 13, so CUDA 12's runtime library comes along
#   (nvidia-cuda-runtime-cu12, 1 MB; gpu_check.sh puts it on the loader's path, where no CUDA 13
#   program looks for it). Whether its kernels run there is not yet seen: the attention
#   benchmark's xformers row probes a small call and skips with the error if they do not.
# - not carried: flash-attn (no wheel: it is compiled against one torch and CUDA, its rows appear
#   only where it is installed) and NVIDIA's apex (not on PyPI, whose "apex" is an unrelated
#   package; it builds from its git sources with nvcc against the installed torch, and neither
#   those sources nor a network reach the GPU machine). The step benchmark's apex row
#   (FusedAdam, FusedLayerNorm) runs only where apex is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --platform any -d .whl \
  pytest pytest-benchmark py-cpuinfo pluggy iniconfig packaging pytest-timeout \
  liger-kernel cut-cross-entropy open_clip_torch ftfy wcwidth inf-cl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  xformers==0.0.35 "nvidia-cuda-runtime-cu12>=12.8,<12.9"
ls .whl
