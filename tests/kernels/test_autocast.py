"""Every op under torch.autocast: the rule (matmul inputs cast to the autocast dtype at entry, the
op's own fp32 math inside, losses in fp32, attention in the autocast dtype) on every backend and
reduction, against the readable reference run on the explicitly cast inputs in fp32.

The fp32 reference sees exactly the bf16-rounded values the op sees, so the loss must agree to fp32
accuracy; the gradients come back through the bf16 cast, so they agree to bf16 accuracy.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from unigen._extension import cpp_ops_available
from unigen.kernels import contrastive_loss, fused_linear_cross_entropy, prefix_lm_attention
from unigen.kernels.common.backend import triton_available

cl_module = importlib.import_module("unigen.kernels.contrastive_loss")
cl_launch = importlib.import_module("unigen.kernels.contrastive_loss.launch")  # reads the tiles
attn_module = importlib.import_module("unigen.kernels.prefix_lm_attention")

_needs_triton = pytest.mark.skipif(not triton_available(), reason="needs triton")
_needs_cpp = pytest.mark.skipif(not cpp_ops_available(), reason="unigen._C not built")
_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEVICES = ["cpu", pytest.param("cuda", marks=[_needs_cuda, pytest.mark.gpu])]
# bf16 on CPU (the CPU autocast dtype), fp16 and bf16 on CUDA
AUTOCAST = [("cpu", torch.bfloat16), pytest.param(("cuda", torch.float16), marks=[_needs_cuda, pytest.mark.gpu]),
            pytest.param(("cuda", torch.bfloat16), marks=[_needs_cuda, pytest.mark.gpu])]
GRAD_TOL = {torch.bfloat16: dict(rtol=2e-2, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=2e-4)}
# Gradients: the kernels keep their logit/probability gradients in the input precision (tensor-core
# matmuls), so an entry's error is a few roundings of the sums it collects: relative to the largest.
GRAD_SCALE_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _assert_grad_close(got, want, dtype, name):
    assert got.dtype == torch.float32, name  # the fp32 leaves get fp32 gradients through the cast
    tol = GRAD_SCALE_TOL[dtype]
    torch.testing.assert_close(got, want, rtol=2 * tol, atol=tol * want.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def _rounded(x, dtype):
    """What the op sees under autocast, as an fp32 leaf of the reference."""
    return x.detach().to(dtype).float().requires_grad_()


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


# ---------------------------------------------------------------------------------------------
# fused_linear_cross_entropy
# ---------------------------------------------------------------------------------------------

FLCE_BACKENDS = ["torch", pytest.param("cpp", marks=_needs_cpp), pytest.param("triton", marks=_needs_triton)]


def _flce_reference(h, w, t, b, *, reduction, softcap=None, token_weights=None):
    z = F.linear(h, w, b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    rows = F.cross_entropy(z, t, reduction="none")
    if token_weights is not None:
        rows = rows * token_weights
    valid = (t != -100).float() * (token_weights if token_weights is not None else 1.0)
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]


@pytest.mark.parametrize("device_dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("backend", FLCE_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("extra", ["plain", "softcap", "token_weights"])
def test_fused_linear_cross_entropy_under_autocast(device_dtype, backend, reduction, extra):
    device, dtype = device_dtype
    if backend == "cpp" and device != "cpu":
        pytest.skip("the C++ op runs on CPU tensors")
    g = torch.Generator().manual_seed(0)
    n, d, v = 37, 24, 203
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).to(device).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g).to(device)
    t[::5] = -100
    kwargs = {}
    if extra == "softcap":
        kwargs["softcap"] = 1.5
    if extra == "token_weights":
        kwargs["token_weights"] = torch.rand(n, generator=g).to(device)
    with torch.autocast(device, dtype=dtype):
        loss = fused_linear_cross_entropy(h, w, t, b, reduction=reduction, backend=backend, **kwargs)
    assert loss.dtype == torch.float32  # as autocast's F.cross_entropy
    leaves = [_rounded(x, dtype) for x in (h, w, b)]
    ref = _flce_reference(*leaves[:2], t, leaves[2], reduction=reduction, **kwargs)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    upstream = (torch.randn(ref.shape, generator=g).to(device) if reduction == "none"
                else torch.tensor(1.0, device=device))
    grads = torch.autograd.grad(loss, (h, w, b), upstream)
    ref_grads = torch.autograd.grad(ref, leaves, upstream)
    for name, got, want in zip(("hidden", "weight", "bias"), grads, ref_grads):
        _assert_grad_close(got, want, dtype, name)


def test_fused_linear_cross_entropy_issue_case_and_half_inputs():
    """The reported failure (reduced loss, fp32 inputs, CPU bf16 autocast), and bf16 inputs with an
    fp32 head: both cast to bf16 as F.linear would be."""
    h, w, t = torch.randn(8, 16), torch.randn(50, 16), torch.randint(0, 50, (8,))
    for backend in ("auto", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = fused_linear_cross_entropy(h, w, t, backend=backend)
            mixed = fused_linear_cross_entropy(h.bfloat16(), w, t, backend=backend)
            linear_ce = F.cross_entropy(F.linear(h, w), t)  # autocast: bf16 logits, fp32 loss
        torch.testing.assert_close(mixed, ours)
        # ours differs from autocast's own formula only by its unrounded (fp32) logits
        torch.testing.assert_close(ours, linear_ce, rtol=2e-2, atol=2e-2)


def test_fused_linear_cross_entropy_autocast_traces_under_compile():
    h = torch.randn(12, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 40, (12,))

    def step(h, w, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fused_linear_cross_entropy(h, w, t, backend="torch")

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(h, w, t), step(h, w, t))
    torch._dynamo.reset()


def test_autocast_off_is_unchanged():
    """Without autocast (or autocast on another device type) nothing is cast."""
    h, w = torch.randn(8, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    t = torch.randint(0, 50, (8,))
    plain = fused_linear_cross_entropy(h, w, t, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is never cast, as autocast does
        assert torch.equal(fused_linear_cross_entropy(h, w, t, backend="torch"), plain)
    assert plain.dtype == torch.float64


# ---------------------------------------------------------------------------------------------
# contrastive_loss
# ---------------------------------------------------------------------------------------------

CL_BACKENDS = ["torch", pytest.param("triton", marks=_needs_triton)]


@pytest.mark.parametrize("device_dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("backend", CL_BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_contrastive_loss_under_autocast(device_dtype, backend, normalize, monkeypatch):
    device, dtype = device_dtype
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", (16, 16))
    g = torch.Generator().manual_seed(0)
    image = torch.randn(21, 16, generator=g).to(device)
    text = torch.randn(21, 16, generator=g).to(device)
    if not normalize:
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    image.requires_grad_()
    text.requires_grad_()
    scale = torch.tensor(8.0, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        out = contrastive_loss(image, text, scale, negatives="hardest", normalize=normalize, backend=backend)
    assert out.loss.dtype == torch.float32
    ri, rt = _rounded(image, dtype), _rounded(text, dtype)
    rs = scale.detach().clone().requires_grad_()
    if normalize:
        ref = cl_module.contrastive_loss_reference(ri, rt, rs, negatives="hardest")
        ref_loss, ref_neg = ref.loss, ref.neg_text_for_image
    else:
        logits = rs * ri @ rt.T
        labels = torch.arange(21, device=device)
        ref_loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        ref_neg = logits.detach().fill_diagonal_(float("-inf")).argmax(1)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.neg_text_for_image, ref_neg)
    grads = torch.autograd.grad(out.loss, (image, text, scale))
    ref_grads = torch.autograd.grad(ref_loss, (ri, rt, rs))
    for name, got, want in zip(("image", "text", "scale"), grads, ref_grads):
        _assert_grad_close(got, want, dtype, name)


# ---------------------------------------------------------------------------------------------
# prefix_lm_attention
# ---------------------------------------------------------------------------------------------

ATTN_BACKENDS = ["torch", "sdpa", pytest.param("triton", marks=_needs_triton)]


@pytest.mark.parametrize("device_dtype", AUTOCAST, ids=str)
@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_prefix_lm_attention_under_autocast(device_dtype, backend):
    device, dtype = device_dtype
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 13, 20], dtype=torch.int32, device=device)
    prefix = torch.tensor([2, 0, 7], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(20, 2, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    with torch.autocast(device, dtype=dtype):
        out = prefix_lm_attention(q, k, v, cu, prefix, max_seqlen=8, backend=backend)
    assert out.dtype == dtype  # as autocast's scaled_dot_product_attention
    leaves = [_rounded(x, dtype) for x in (q, k, v)]
    ref = attn_module.prefix_lm_attention_reference(*leaves, cu, prefix)
    # the output is rounded to the autocast dtype once
    torch.testing.assert_close(out.float(), ref, **GRAD_TOL[dtype])
    upstream = torch.randn(ref.shape, generator=g).to(device)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(dtype))
    ref_grads = torch.autograd.grad(ref, leaves, upstream.to(dtype).float())
    for name, got, want in zip("qkv", grads, ref_grads):
        _assert_grad_close(got, want, dtype, f"d{name}")
