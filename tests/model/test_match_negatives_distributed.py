"""The [match] hard negatives under data parallelism (2 gloo processes) and their sampling law.

The negatives are mined among each process's own pairs (``unigen.model.losses.pair_contrastive``
says why): every pair that has a non-positive local pair gets exactly two, on any number of
processes, while L_CL stays the global batch's. The ranks run in a subprocess started from here,
so pytest's process never initialises torch.distributed."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from unigen.model.losses import mine_local_negatives

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_match_negatives_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.timeout(300)
def test_two_processes_keep_both_negatives_of_every_pair():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, WORKER], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "distributed match negatives OK" in proc.stdout


def _features():
    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    ids = torch.tensor([0, 0, 1, 2, 3])  # pairs 0 and 1 are positives of each other
    return img, txt, ids, torch.tensor(2.5)


def _law(sim: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """softmax of each row's similarity over its non-positives (the law the fused op uses)."""
    return torch.softmax(sim.masked_fill(ids[:, None] == ids[None, :], float("-inf")), dim=1)


def test_local_negatives_follow_softmax_over_local_non_positives():
    img, txt, ids, scale = _features()
    sim = scale * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(
        txt, dim=-1).t()
    draws = 4000
    gen = torch.Generator().manual_seed(0)
    counts_t, counts_i = torch.zeros(5, 5), torch.zeros(5, 5)
    rows = torch.arange(5)
    for _ in range(draws):
        nt, ni = mine_local_negatives(img, txt, scale, ids, "sample", gen)
        counts_t[rows, nt] += 1
        counts_i[rows, ni] += 1
    for counts, s in ((counts_t, sim), (counts_i, sim.t())):
        p = _law(s, ids)
        assert torch.all(counts[p == 0] == 0)  # never a positive
        # 4000 draws: a frequency's standard error is at most 0.008; 0.04 is five of them
        torch.testing.assert_close(counts / draws, p, atol=0.04, rtol=0)


def test_local_negatives_hardest_and_rows_without_candidate():
    img, txt, ids, scale = _features()
    sim = scale * torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(
        txt, dim=-1).t()
    nt, ni = mine_local_negatives(img, txt, scale, ids, "hardest")
    assert torch.equal(nt, _law(sim, ids).argmax(1))
    assert torch.equal(ni, _law(sim.t(), ids).argmax(1))
    nt, ni = mine_local_negatives(img[:2], txt[:2], scale, ids[:2], "sample")
    assert nt.tolist() == ni.tolist() == [-1, -1]  # one image's two captions: no candidate


def test_uniform_negatives_ignore_the_similarity():
    """hard_negatives="uniform" (the negatives of a run without L_CL): uniform over the
    non-positives whatever the features."""
    img, txt, ids, scale = _features()
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(5, 5)
    for _ in range(3000):
        nt, _ = mine_local_negatives(img, txt, scale, ids, "uniform", gen)
        counts[torch.arange(5), nt] += 1
    allowed = (ids[:, None] != ids[None, :]).float()
    torch.testing.assert_close(counts / 3000, allowed / allowed.sum(1, keepdim=True),
                               atol=0.045, rtol=0)
