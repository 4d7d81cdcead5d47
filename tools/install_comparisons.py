"""Install the public alternatives the benchmarks compare against, under the installed torch.

    make compare-deps        (python tools/install_comparisons.py [--only NAME ...])

Each package is installed on its own with pip, constrained to requirements/compare.lock (its
exact versions, resolved against dev.lock's torch) and to the torch and triton installed now, so
pip can never replace them: a package that would need another torch fails to install instead,
and is reported with pip's reason. A package that installs but does not import (open_clip needs
torchvision, and PyPI's torchvision is built against PyPI's CUDA torch, not the CPU build) is
uninstalled again with what came in with it, so that nothing half-working stays (transformers
imports torchvision whenever it is installed). flash-attn, xformers and apex are compiled against
one torch and CUDA: they are tried only where torch is a CUDA build. At the end torch and triton
are checked to be the versions they were; the exit status is 1 if they are not.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARE_LOCK = os.path.join(ROOT, "requirements", "compare.lock")


class Comparison:
    def __init__(self, name, module, *, needs_cuda=False, pip_name=None, why_not=None, binary_only=False):
        self.name, self.module, self.needs_cuda = name, module, needs_cuda
        self.pip_name = pip_name or name
        self.why_not = why_not  # a reason it is never installed from PyPI
        self.binary_only = binary_only  # never compile it here (a CUDA build takes an hour)


COMPARISONS = [
    Comparison("liger-kernel", "liger_kernel"),
    Comparison("cut-cross-entropy", "cut_cross_entropy"),
    Comparison("inf-cl", "inf_cl"),
    Comparison("open_clip_torch", "open_clip"),
    Comparison("flash-attn", "flash_attn", needs_cuda=True, binary_only=True),
    Comparison("xformers", "xformers", needs_cuda=True, binary_only=True),
    Comparison("apex", "apex", needs_cuda=True,
               why_not="NVIDIA's apex is not on PyPI (PyPI's 'apex' is another project): build it from "
                       "github.com/NVIDIA/apex on a CUDA machine"),
]


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def distributions() -> dict[str, str]:
    return {d.metadata["Name"].lower().replace("_", "-"): d.version for d in metadata.distributions()}


def run_python(code: str) -> subprocess.CompletedProcess:
    # a fresh interpreter: what was imported here before an install says nothing about after it
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def torch_versions() -> tuple[str, str | None, bool]:
    proc = run_python("import torch; print(torch.__version__); print(torch.version.cuda)")
    if proc.returncode:
        raise SystemExit(f"install_comparisons: torch does not import in {sys.executable}:\n{proc.stderr}")
    version, cuda = proc.stdout.split()
    return version, installed("triton"), cuda != "None"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1].strip() if lines else "(no output)"


def constraints_file(torch_version: str, triton_version: str | None) -> str:
    """The installed torch and triton pinned, plus compare.lock where it was resolved for them."""
    lines = [f"torch=={torch_version}"] + ([f"triton=={triton_version}"] if triton_version else [])
    with open(COMPARE_LOCK) as f:
        lock = f.read()
    if f"torch=={torch_version}\n" in lock:
        lines += [line for line in lock.splitlines()
                  if "==" in line and not line.startswith(("#", "torch==", "triton=="))]
    handle = tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False)
    handle.write("\n".join(lines) + "\n")
    handle.close()
    return handle.name


def install(comparison: Comparison, constraints: str, cuda_torch: bool, torch_version: str) -> str:
    """Install one comparison; returns the line of the report."""
    if comparison.why_not:
        return f"not installed: {comparison.why_not}"
    if comparison.needs_cuda and not cuda_torch:
        return f"not installed: compiled against a CUDA build of torch (this torch is {torch_version})"
    before = distributions()
    args = [sys.executable, "-m", "pip", "install", "-q", "-c", constraints, comparison.pip_name]
    if comparison.binary_only:
        args.insert(4, "--only-binary=:all:")
    if os.environ.get("TORCH_INDEX"):  # PyTorch's index: its torchvision matches its CPU torch
        args[4:4] = ["--extra-index-url", os.environ["TORCH_INDEX"]]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode:
        return f"not installed: pip: {last_line(proc.stderr)}"
    check = run_python(f"import {comparison.module}")
    if check.returncode:
        added = sorted(set(distributions()) - set(before))
        if added:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *added], capture_output=True)
        hint = ""
        if "torchvision" in added and not cuda_torch and not os.environ.get("TORCH_INDEX"):
            hint = (" (PyPI's torchvision is built for PyPI's CUDA torch; PyTorch's CPU index has the one "
                    "for this torch: make compare-deps TORCH_INDEX=https://download.pytorch.org/whl/cpu)")
        return (f"not usable here, uninstalled again with {', '.join(added) or 'nothing else'}: "
                f"import {comparison.module}: {last_line(check.stderr)}{hint}")
    return f"installed {installed(comparison.pip_name)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="make compare-deps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[c.name for c in COMPARISONS],
                        help="install only these")
    args = parser.parse_args(argv)
    torch_version, triton_version, cuda_torch = torch_versions()
    print(f"[unigen] comparisons under torch {torch_version}, triton {triton_version} "
          f"({'CUDA' if cuda_torch else 'CPU'} build), which stay as they are", flush=True)
    constraints = constraints_file(torch_version, triton_version)
    try:
        for comparison in COMPARISONS:
            if args.only and comparison.name not in args.only:
                continue
            print(f"  {comparison.name:<18} ", end="", flush=True)
            print(install(comparison, constraints, cuda_torch, torch_version), flush=True)
    finally:
        os.unlink(constraints)
    after = torch_versions()[:2]
    if after != (torch_version, triton_version):
        print(f"[unigen] torch/triton changed: {torch_version}/{triton_version} -> {after[0]}/{after[1]}; "
              f"rerun make bootstrap to restore the lock", file=sys.stderr)
        return 1
    print(f"[unigen] torch {after[0]} and triton {after[1]} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
