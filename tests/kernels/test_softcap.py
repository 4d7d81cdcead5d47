"""fused_linear_cross_entropy's ``softcap`` (Gemma 2's final_logit_softcapping): the loss of
c·tanh(logits/c) and its gradients, on every backend, against the materialised formula."""

import pytest
import torch
import torch.nn.functional as F

from unigen._extension import cpp_ops_available
from unigen.kernels import fused_linear_cross_entropy
from unigen.kernels.common.backend import triton_available

BACKENDS = ["torch",
            pytest.param("cpp", marks=pytest.mark.skipif(not cpp_ops_available(), reason="unigen._C not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="needs triton"))]


def _formula(h, w, t, b, cap, label_smoothing, z_loss):
    z = cap * torch.tanh(F.linear(h, w, b) / cap)  # the transformers models' three steps
    rows = F.cross_entropy(z, t, reduction="none", label_smoothing=label_smoothing)
    return rows + z_loss * torch.where(t != -100, torch.logsumexp(z, -1) ** 2, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("cap,label_smoothing,z_loss", [(30.0, 0.0, 0.0), (0.7, 0.1, 1e-3)])
def test_softcap_matches_formula(backend, reduction, cap, label_smoothing, z_loss):
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(3)
    n, d, v = 29, 20, 333  # logits of several units: a cap of 0.7 saturates many of them
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    loss = fused_linear_cross_entropy(h, w, t, b, softcap=cap, label_smoothing=label_smoothing, z_loss=z_loss,
                                      reduction=reduction, backend=backend)
    rows = _formula(h, w, t, b, cap, label_smoothing, z_loss)
    ref = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / (t != -100).sum()}[reduction]
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss, ref, **tol)
    upstream = torch.randn(ref.shape, generator=g, dtype=dtype)
    for got, want in zip(torch.autograd.grad(loss, (h, w, b), upstream), torch.autograd.grad(ref, (h, w, b), upstream)):
        torch.testing.assert_close(got, want, **tol)


def test_softcap_none_or_zero_is_no_cap_and_bad_values_refused():
    h, w = torch.randn(6, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    t = torch.randint(0, 30, (6,))
    plain = fused_linear_cross_entropy(h, w, t, backend="torch")
    assert torch.equal(fused_linear_cross_entropy(h, w, t, softcap=0.0, backend="torch"), plain)
    assert not torch.allclose(fused_linear_cross_entropy(h, w, t, softcap=1.0, backend="torch"), plain)
    for bad in (-1.0, float("inf"), "30", True):
        with pytest.raises(ValueError, match="softcap must be None or a finite float >= 0"):
            fused_linear_cross_entropy(h, w, t, softcap=bad)
