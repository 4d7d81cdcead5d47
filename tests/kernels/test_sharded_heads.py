"""Sharded head weights, on 2 gloo processes against one unsharded process:

- the vocabulary-parallel fused cross-entropy (``process_group=`` with each rank's slice, and a
  ``Shard(0)`` DTensor weight): loss, statistics and every gradient equal the unsharded op's for
  label smoothing, z-loss, soft-cap, ignored rows, token weights and every reduction;
- ``patch_hf_model`` under FSDP2 in every wrapping (root, per layer, the head alone, norm + head,
  tied embeddings, either reshard setting, patched before or after ``fully_shard``) and with a
  tensor-parallel head (``ColwiseParallel``: the vocabulary split, no rank forms logits).

The ranks run in a subprocess started from here (the worker scripts spawn them), so pytest's
process never initialises torch.distributed.
"""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _run(script, *args, expect):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), *args], env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert expect in proc.stdout
    return proc.stdout


@needs_gloo
@pytest.mark.timeout(300)
def test_vocabulary_parallel_op_matches_the_unsharded_op():
    _run("_flce_vocab_parallel_worker.py", expect="vocabulary-parallel fused_linear_cross_entropy OK")


@needs_gloo
@pytest.mark.timeout(300)
def test_patched_model_under_fsdp2_every_wrapping():
    pytest.importorskip("transformers")
    out = _run("_hf_sharded_worker.py", "fsdp", expect="sharded patch_hf_model OK (fsdp)")
    assert out.count(": OK") == 8


@needs_gloo
@pytest.mark.timeout(300)
def test_patched_model_with_a_tensor_parallel_head():
    pytest.importorskip("transformers")
    out = _run("_hf_sharded_worker.py", "tp", expect="sharded patch_hf_model OK (tp)")
    assert out.count(": OK") == 4


@needs_gloo
@pytest.mark.timeout(300)
def test_patched_model_under_deepspeed_zero3():
    """ZeRO-3 on CPU (gloo): DeepSpeed gathers the partitioned head weight around the head's
    forward, where the patch reads it. deepspeed 0.19.8 is in the dev lock (its CPU comm
    op is JIT-built on first use); skips in an environment without deepspeed."""
    pytest.importorskip("transformers")
    pytest.importorskip("deepspeed")
    out = _run("_hf_zero3_worker.py", expect="ZeRO-3 patch_hf_model OK")
    assert out.count(": OK") == 2


def test_process_group_needs_distributed_and_a_torch_backend():
    import torch

    from unigen.kernels import fused_linear_cross_entropy

    h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 4])
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="process_group given but torch.distributed is not initialised"):
            fused_linear_cross_entropy(h, w, t, process_group=object())
