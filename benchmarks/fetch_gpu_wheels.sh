#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git; name it in the device call's `carry`) the pure-Python
# packages the GPU check may need there: the benchmark runner, and the public alternatives the
# benchmarks compare against (Liger-Kernel, Cut Cross-Entropy, open_clip with ftfy, Inf-CL).
# Run on a machine with PyPI access. benchmarks/gpu_check.sh installs only those whose modules
# the GPU machine lacks. flash-attn has no pure-Python wheel (it is compiled against one torch
# and CUDA), so its rows appear only where it is installed already.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --platform any -d .whl \
  pytest pytest-benchmark py-cpuinfo pluggy iniconfig packaging pytest-timeout \
  liger-kernel cut-cross-entropy open_clip_torch ftfy wcwidth inf-cl
ls .whl
