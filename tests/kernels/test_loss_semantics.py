"""The semantics questions the public alternatives' test suites raised (issue 28, item 5):

- a weighted mean whose weights sum to <= 0 (RL advantages): ``Σw·l / Σw`` for any non-zero sum,
  nan with zero gradients for a zero sum, on every backend and path;
- per-class weights with ``F.cross_entropy(weight=...)``'s exact semantics, label smoothing
  included;
- one output-dtype rule: every loss is fp32 (fp64 for fp64 inputs), autocast or not;
- the reduced path's bf16 gradient view on CPU (oneDNN returned NaN rows for its strided layout
  on some CPUs): a dense copy is multiplied, the gradients equal the PyTorch path's.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from unigen._extension import cpp_ops_available
from unigen.kernels import ClipLoss, FusedLinearCrossEntropyLoss, contrastive_loss, fused_linear_cross_entropy

BACKENDS = ["torch"] + (["cpp"] if cpp_ops_available() else []) + (
    ["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])


def _inputs(n=37, d=16, v=29, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(v, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[::4] = -100
    return h, w, b, t


def _grads(loss, xs):
    return torch.autograd.grad(loss.sum(), xs, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weights_grad", [False, True], ids=["reduced-path", "rows-path"])
def test_weighted_mean_with_weights_summing_to_zero_or_less(backend, weights_grad):
    dtype = torch.float32 if backend == "triton" else torch.float64
    h, w, b, t = _inputs(dtype=dtype)
    logits = F.linear(h, w, b)
    rows = F.cross_entropy(logits, t, reduction="none")
    g = torch.Generator().manual_seed(3)
    for case in ("negative", "zero"):
        tw = torch.randn(t.shape, generator=g, dtype=dtype) - (1.0 if case == "negative" else 0.0)
        if case == "zero":  # ±1 on the rows that count (0 on the odd one out): Σw = 0 exactly
            n_valid = int((t != -100).sum())
            signs = torch.tensor([1.0, -1.0], dtype=dtype).repeat(n_valid)[:n_valid]
            signs[-1] = 0.0 if n_valid % 2 else signs[-1]
            tw[t != -100] = signs
        tw.requires_grad_(weights_grad)
        ours = fused_linear_cross_entropy(h, w, t, b, token_weights=tw, backend=backend)
        denom = tw[t != -100].sum()
        if case == "negative":
            assert denom < 0
            ref = (rows * tw).sum() / denom  # PyTorch's weighted-mean convention, sign and all
            tol = 1e-4 if dtype == torch.float32 else 1e-10
            torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=tol, atol=tol)
            for a, r in zip(_grads(ours, (h, w, b)), _grads(ref, (h, w, b))):
                torch.testing.assert_close(a, r, rtol=10 * tol, atol=10 * tol)
        else:
            assert denom == 0
            assert torch.isnan(ours)  # 0 weight in all: no mean, as every row ignored
            assert all(not x.any() for x in _grads(ours, (h, w, b)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_class_weights_have_pytorch_semantics(backend, eps, reduction):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    h, w, b, t = _inputs(n=41, d=20, v=131, dtype=dtype)
    cw = torch.rand(131, generator=torch.Generator().manual_seed(5), dtype=dtype) * 2
    ref = F.cross_entropy(F.linear(h, w, b), t, weight=cw, label_smoothing=eps, reduction=reduction)
    ours = fused_linear_cross_entropy(h, w, t, b, class_weights=cw, label_smoothing=eps, reduction=reduction,
                                      backend=backend)
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=tol, atol=tol)
    for a, r in zip(_grads(ours, (h, w, b)), _grads(ref, (h, w, b))):
        torch.testing.assert_close(a, r, rtol=10 * tol, atol=10 * tol)


def test_class_weights_with_token_weights_and_bad_input():
    h, w, b, t = _inputs()
    cw = torch.rand(29, dtype=torch.float64)
    tw = torch.rand(37, dtype=torch.float64)
    rows = F.cross_entropy(F.linear(h, w, b), t, weight=cw, label_smoothing=0.1, reduction="none")
    valid = t != -100
    ref = (rows * tw).sum() / (cw[t.clamp(min=0)] * tw * valid).sum()
    ours = fused_linear_cross_entropy(h, w, t, b, class_weights=cw, token_weights=tw, label_smoothing=0.1)
    torch.testing.assert_close(ours, ref)
    module = FusedLinearCrossEntropyLoss(class_weights=cw, label_smoothing=0.1)
    torch.testing.assert_close(module(h, w, t, b, token_weights=tw), ref)
    with pytest.raises(ValueError, match="class_weights has 5 entries, weight has V=29"):
        fused_linear_cross_entropy(h, w, t, class_weights=torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="class_weights with z_loss"):
        fused_linear_cross_entropy(h, w, t, class_weights=cw, z_loss=1e-4)
    with pytest.raises(ValueError, match="label_smoothing and softcap"):
        fused_linear_cross_entropy(h, w, t, class_weights=cw, label_smoothing=0.1, softcap=5.0)
    with pytest.raises(TypeError, match="class_weights must have dtype"):
        fused_linear_cross_entropy(h, w, t, class_weights=torch.ones(29, dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loss_is_fp32_or_fp64(backend):
    """One rule for every op's loss: fp32 (fp64 for fp64 inputs), with or without autocast."""
    for dtype, expect in ((torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                          (torch.float32, torch.float32), (torch.float64, torch.float64)):
        if backend == "triton" and dtype == torch.float64:
            continue
        h, w, b, t = _inputs(dtype=dtype)
        for reduction in ("mean", "sum", "none"):
            assert fused_linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend).dtype == expect
        if backend == "torch":
            img, txt = h[:8].detach(), h[8:16].detach()
            assert contrastive_loss(img, txt, 10.0, negatives=None).loss.dtype == expect
            clip = ClipLoss()
            assert clip(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0)).dtype == expect
            # the formula fallback too (a tensor-valued logit_bias)
            assert clip(F.normalize(img, dim=-1), F.normalize(txt, dim=-1), torch.tensor(10.0),
                        torch.zeros(8, 8, dtype=dtype)).dtype == expect


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton path on CPU needs TRITON_INTERPRET=1")
def test_reduced_bf16_gradient_view_on_cpu_gives_the_pytorch_gradients():
    """R = 188 rows, V = 123 (K of the dH GEMM not a multiple of 32), bf16 under autocast: the
    layout where oneDNN returned NaN rows from the strided bf16 view."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(188, 20, generator=g).requires_grad_()
    w = torch.randn(123, 20, generator=g).requires_grad_()
    t = torch.randint(0, 123, (188,), generator=g)
    got = {}
    for backend in ("triton", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(h, w, t, backend=backend)
        got[backend] = (loss, *torch.autograd.grad(loss, (h, w)))
    for a, r in zip(got["triton"], got["torch"]):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)
