"""The row-chunked "mean"/"sum" path of fused_linear_cross_entropy: the matmul FLOPs it launches
(6·N·D·V, the logits computed once) and the bf16 error of its dW accumulated over many row
blocks (compensated: within ~2× of PyTorch's bf16 computation, where a plain bf16 accumulator
drifts with the number of blocks)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unigen.kernels import fused_linear_cross_entropy
from unigen.kernels.common.backend import triton_available, triton_interpreting

# the modules whose globals the paths read: the launchers, the CPU row-block path, and the op that
# dispatches to them
launch = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
cpu_path = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.cpu")
op = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.op")


def make_inputs(n, d, v, dtype, *, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(0, v, (n,), generator=g)


def naive_sum(hidden, weight, target):
    return F.cross_entropy(F.linear(hidden, weight), target, reduction="sum")


def grads(loss, inputs, upstream):
    return torch.autograd.grad(loss, inputs, upstream)

BACKENDS = ["torch"] + (["triton"] if triton_available() and triton_interpreting() else [])


def _matmul_flops(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _small_blocks(monkeypatch):
    """Row blocks of 16 rows on both paths, so one call launches many of them."""
    monkeypatch.setattr(launch, "REDUCED_WORKING_BYTES", 0)
    monkeypatch.setattr(launch, "MIN_ROW_BLOCK", 16)
    monkeypatch.setattr(cpu_path, "REDUCED_CPU_BLOCK_BYTES", 0)


# the implementations behind the reduced custom op, as op.py names them (and dispatches to them)
IMPLS = {"torch": "reference_forward_reduced", "triton": "triton_forward_reduced"}


def _reduced_pass(backend, hidden, weight, target, need_hidden, need_weight):
    """The whole work of a "mean"/"sum" forward + backward: the implementation behind the
    custom op (a dispatch mode sees the op itself as one opaque call, not the GEMMs inside);
    the backward only rescales the gradients this returns."""
    scale = torch.ones(target.shape[0])
    impl = getattr(op, IMPLS[backend])
    return impl(hidden.detach(), weight.detach(), None, target, scale, -100, 0.1, 1e-3,
                need_hidden, need_weight, False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trainable", ["both", "hidden", "weight", "none"])
def test_reduced_path_launches_6ndv_matmul_flops(monkeypatch, backend, trainable):
    """2·N·D·V for the logits, + 2·N·D·V for dH and for dW when each is needed (the GEMM of a
    frozen input is skipped), summed over many row blocks (N = 80 rows in blocks of 16). No
    ignored rows: they would still pass the GEMMs on the Triton path."""
    _small_blocks(monkeypatch)
    n, d, v = 80, 24, 203
    hidden, weight, target = make_inputs(n, d, v, torch.float32)
    need = (trainable in ("both", "hidden"), trainable in ("both", "weight"))
    flops = _matmul_flops(lambda: _reduced_pass(backend, hidden, weight, target, *need))
    assert flops == 2 * n * d * v * (1 + sum(need))
    if trainable == "both":
        assert flops == 6 * n * d * v


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_mean_path_is_the_counted_one(monkeypatch, backend):
    """fused_linear_cross_entropy(reduction="mean") runs exactly the counted implementation,
    once per call (the forward computes the gradients, the backward runs no matmul)."""
    calls = []
    impl = getattr(op, IMPLS[backend])
    monkeypatch.setattr(op, IMPLS[backend], lambda *a, **k: calls.append(a[8:11]) or impl(*a, **k))
    hidden, weight, target = make_inputs(20, 8, 30, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, target, backend=backend)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    assert calls == [(True, True, False)]
    assert counter.get_total_flops() == 0


@pytest.mark.skipif("triton" not in BACKENDS, reason="runs the kernels under TRITON_INTERPRET=1")
def test_reduced_bf16_path_launches_6ndv_flops(monkeypatch):
    """bf16: dW is accumulated by the compensated Triton kernel, which FlopCounterMode cannot
    see; its launches are counted from their shapes (2·rows·V·D each)."""
    _small_blocks(monkeypatch)
    kahan_flops = []
    launch_dw = launch._launch_dw_kahan

    def counted(dz, h, grad_w, comp):
        kahan_flops.append(2 * dz.shape[0] * dz.shape[1] * h.shape[1])
        return launch_dw(dz, h, grad_w, comp)

    monkeypatch.setattr(launch, "_launch_dw_kahan", counted)
    n, d, v = 48, 16, 101
    hidden, weight, target = make_inputs(n, d, v, torch.bfloat16)

    torch_flops = _matmul_flops(lambda: _reduced_pass("triton", hidden, weight, target, True, True))
    assert len(kahan_flops) == 3  # one launch per 16-row block
    assert torch_flops == 4 * n * d * v
    assert torch_flops + sum(kahan_flops) == 6 * n * d * v


@pytest.mark.skipif("triton" not in BACKENDS, reason="runs the kernels under TRITON_INTERPRET=1")
def test_reduced_bf16_weight_gradient_within_2x_of_pytorch(monkeypatch):
    """dW summed over 24 row blocks in bf16 stays within 2× the error of PyTorch's bf16
    computation (one GEMM over all rows, rounded once) against an fp64 reference. A plain bf16
    accumulator (each block's product added to the rounded running sum) is measured alongside:
    its error grows with the number of blocks, which is what the compensation removes."""
    _small_blocks(monkeypatch)
    hidden, weight, target = make_inputs(384, 32, 300, torch.bfloat16, scale=2.0)
    one = torch.tensor(1.0, dtype=torch.bfloat16)
    exact_in = [x.detach().double().requires_grad_() for x in (hidden, weight)]
    exact = grads(naive_sum(*exact_in, target), exact_in,
                  torch.tensor(1.0, dtype=torch.float64))
    same = grads(naive_sum(hidden, weight, target), (hidden, weight), one)

    def ours():
        loss = fused_linear_cross_entropy(hidden, weight, target, reduction="sum", backend="triton")
        return grads(loss, (hidden, weight), one)

    compensated = ours()
    monkeypatch.setattr(launch, "_launch_dw_kahan", lambda dz, h, grad_w, comp: grad_w.addmm_(dz.t(), h))
    plain = ours()
    err = lambda a, e: (a.double() - e).abs().max().item()
    assert err(compensated[0], exact[0]) <= 2 * err(same[0], exact[0])
    assert err(compensated[1], exact[1]) <= 2 * err(same[1], exact[1])
    assert err(plain[1], exact[1]) > 1.5 * err(compensated[1], exact[1])
