"""The pytest plugin of ``benchmarks/gpu_check.sh`` (``-p benchmarks.gpu_check_plugin``): the
order in which a stage runs its items, so that a stage cut at its time limit has already
measured or checked what matters most.

Within a stage, in this order:

1. the GPU tests named in the curated list (``benchmarks/gpu_quick_tests.txt``, the file named
   by ``UNIGEN_GPU_CHECK_FIRST``), in the list's order: the headline kernels' correctness first;
2. our benchmark rows (the ``ours`` provider, then the other ``ours_*`` rows), then our kernel
   tests (``tests/kernels/``);
3. everything else, in file and parameter order;
4. last, whatever compiles heavily before it runs (FlexAttention, ``torch.compile``): one such
   compile costs tens of seconds, more than the rest of a quick stage.

With ``UNIGEN_GPU_CHECK_SKIP_HEAVY=1`` (the script's ``--dry-run`` on CPU, where those compiles
cost minutes and measure nothing) the heavy items are deselected instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Providers (benchmarks) and test-name parts (tests) that compile heavily before they run.
HEAVY_PROVIDERS = {"flex", "torch.compile", "torch_compiled"}
HEAVY_TEST_PARTS = ("flex", "compile_without", "compiles_without", "torch_compile")


def read_curated(path) -> list[list[str]]:
    """The lines of a curated list, each split into its fields (separated by two or more
    spaces: a node id may hold single spaces); '#' starts a comment."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            rows.append(re.split(r"\s{2,}", line))
    return rows


def read_node_ids(path) -> list[str]:
    """The node ids of a curated list, in its order."""
    return [row[0] for row in read_curated(path)]


def provider_of(item) -> str:
    spec = getattr(item, "callspec", None)
    return str(spec.params.get("provider", "")) if spec else ""


def is_heavy(item) -> bool:
    if provider_of(item) in HEAVY_PROVIDERS:
        return True
    name = item.nodeid.split("::")[-1]
    return any(part in name for part in HEAVY_TEST_PARTS)


def sort_key(item, first: dict[str, int]):
    provider = provider_of(item)
    ours = 0 if provider == "ours" else 1 if provider.startswith("ours") else 2
    listed = first.get(item.nodeid, len(first))
    return (is_heavy(item), listed, ours, not item.nodeid.startswith("tests/kernels/"))


def pytest_collection_modifyitems(session, config, items):
    first_file = os.environ.get("UNIGEN_GPU_CHECK_FIRST")
    first = {node: i for i, node in enumerate(read_node_ids(first_file))} if first_file else {}
    if os.environ.get("UNIGEN_GPU_CHECK_SKIP_HEAVY") == "1":
        heavy = [item for item in items if is_heavy(item)]
        if heavy:
            config.hook.pytest_deselected(items=heavy)
            items[:] = [item for item in items if not is_heavy(item)]
    items.sort(key=lambda item: sort_key(item, first))  # stable: file order within a rank
