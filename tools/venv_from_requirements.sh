#!/usr/bin/env bash
# Makes (or brings up to date) a virtual environment from one requirements file and installs this
# package into it, editable, with unigen._C built against that environment's torch.
#
#   tools/venv_from_requirements.sh [--keep-torch] VENV FILE PYTHON...
#
# FILE ending in .lock: exactly its versions (--no-deps: nothing outside the lock comes in), then
#   `pip check`.
# FILE ending in .in: the newest versions its ranges allow (`make test-latest`), upgrading what is
#   there; the machine's pip constraint file, if any, is not applied (PIP_CONSTRAINT=/dev/null), so
#   "newest" means the newest release on the index.
# PYTHON...: the interpreters to use, best first, as versions (3.12 3.13 3.11) or commands
#   (python3): the first that runs is used, said in a line when it is not the first named
#   (tools/find_python.sh). A venv that exists keeps its interpreter.
# --keep-torch: a venv that already has a torch other than the lock's keeps it (a GPU machine's
#   CUDA build installed by hand), said in one line; the rest of the lock is installed.
# TORCH_INDEX (environment): an extra index for the lock's torch (e.g. PyTorch's CPU index, where
#   torch==2.13.0+cpu lives on a machine whose pip sees plain PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

keep_torch=0
if [ "${1:-}" = "--keep-torch" ]; then keep_torch=1; shift; fi
if [ $# -lt 3 ]; then
  echo "usage: $0 [--keep-torch] VENV REQUIREMENTS_FILE PYTHON..." >&2
  exit 2
fi
venv=$1 file=$2
shift 2
[ -f "$file" ] || { echo "[unigen] $file does not exist" >&2; exit 2; }

python=$(tools/find_python.sh "$@") || exit 2

# the torch this venv has now (before any install), and the lock's
have_torch=""
[ -x "$venv/bin/python" ] && have_torch=$("$venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null || true)
lock_torch=$(sed -n 's/^torch==\([^ ]*\).*/\1/p' "$file")

if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c "" 2>/dev/null; then
  rm -rf "$venv"  # a venv whose interpreter is gone
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)

index=()
[ -n "${TORCH_INDEX:-}" ] && index=(--extra-index-url "$TORCH_INDEX")

if [[ "$file" == *.lock ]]; then
  requirements="$file"
  if [ "$keep_torch" = 1 ] && [ -n "$have_torch" ] && [ -n "$lock_torch" ] && [ "$have_torch" != "$lock_torch" ]; then
    echo "[unigen] keeping this venv's torch $have_torch (the lock has $lock_torch)"
    requirements="$venv/requirements-without-torch.txt"
    grep -v '^torch==' "$file" > "$requirements"
  fi
  # pip and the build tools first, at the lock's versions, then exactly the lock
  tools=$(grep -E '^(pip|setuptools|wheel)==' "$requirements" || true)
  [ -z "$tools" ] || "${pip[@]}" install -q $tools
  "${pip[@]}" install -q --no-deps "${index[@]}" -r "$requirements"
  "${pip[@]}" check
else
  PIP_CONSTRAINT=/dev/null "${pip[@]}" install -q --upgrade pip setuptools wheel
  PIP_CONSTRAINT=/dev/null "${pip[@]}" install -q --upgrade --upgrade-strategy eager "${index[@]}" -r "$file"
fi
# --no-build-isolation: unigen._C is built against the torch just installed (its file name
# carries the Python version, so environments of different Pythons share the checkout)
"${pip[@]}" install -q --no-deps --no-build-isolation -e .
"$venv/bin/python" - <<'PYEOF'
import importlib.metadata as md
import platform

from unigen._extension import cpp_ops_available, cpp_ops_error

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"

print(f"[unigen] Python {platform.python_version()}, "
      + ", ".join(f"{n} {version(n)}" for n in ("torch", "triton", "transformers", "numpy")))
print("[unigen] C++ ops:", "built" if cpp_ops_available() else f"not built ({cpp_ops_error()})")
PYEOF
