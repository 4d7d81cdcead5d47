"""2-process gloo test: the distributed contrastive loss equals the single-process loss on the
concatenated batch (values, gradients, negatives), also with uneven pair counts, with and without
the caller's ``rank_sizes`` (the path without a host sync). The ranks run in a subprocess started from here
(the worker script spawns them with torch.multiprocessing), so pytest's process never initialises
torch.distributed."""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from unigen.kernels.common.backend import triton_available

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_contrastive_dist_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton"))])
@pytest.mark.timeout(300)
def test_two_process_gloo_matches_single_process(backend):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, WORKER, backend], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"distributed contrastive_loss OK ({backend})" in proc.stdout
