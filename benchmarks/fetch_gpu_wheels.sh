#!/usr/bin/env bash
# Downloads the pure-Python test/benchmark dependencies that the GPU machine lacks into .whl/
# (ignored by git; name it in the device call's `carry`). Run on a machine with PyPI access.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation py --platform any -d .whl \
  pytest pytest-benchmark py-cpuinfo pluggy iniconfig packaging pytest-timeout
ls .whl
