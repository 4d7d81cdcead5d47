"""fused_linear_cross_entropy against F.cross_entropy(F.linear(...)) on every backend."""

import pytest
import torch
import torch.nn.functional as F

from unigen._extension import cpp_ops_available
from unigen.kernels import FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from unigen.kernels.common.backend import triton_available

BACKENDS = ["torch"]
if cpp_ops_available():
    BACKENDS.append("cpp")
if triton_available():
    BACKENDS.append("triton")

# (N, D, V): V not a multiple of any block, N = 1, D not a power of two.
SHAPES = [(1, 8, 33), (37, 19, 101), (64, 48, 257)]


def naive_loss(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
               z_loss=0.0, token_weights=None, reduction="mean"):
    """The straightforward formula, in the inputs' own precision."""
    lead = target.shape
    hidden, target = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    logits = F.linear(hidden, weight, bias)
    rows = F.cross_entropy(logits, target, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction="none")
    valid = target != ignore_index
    if z_loss:
        rows = rows + z_loss * torch.where(valid, torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    if token_weights is not None:
        rows = rows * token_weights
        denom = torch.where(valid, token_weights, 0.0).sum()
    else:
        denom = valid.sum()
    if reduction == "none":
        return rows.reshape(lead)
    return rows.sum() if reduction == "sum" else rows.sum() / denom


def make_inputs(n, d, v, dtype, *, bias=True, ignore_every=5, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_every and n > 1:
        target[::ignore_every] = -100
    return hidden, weight, b, target


def grads(loss, inputs, upstream):
    return torch.autograd.grad(loss, [x for x in inputs if x is not None], upstream)


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_naive_fp32_fp64(backend, shape, reduction):
    dtypes = [torch.float32] if backend == "triton" else [torch.float64, torch.float32]
    for dtype in dtypes:
        hidden, weight, bias, target = make_inputs(*shape, dtype)
        ours = fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                          backend=backend)
        ref = naive_loss(hidden, weight, target, bias, reduction=reduction)
        upstream = torch.randn_like(ref)
        tol = _tol(dtype)
        torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
        for a, b in zip(grads(ours, (hidden, weight, bias), upstream),
                        grads(ref, (hidden, weight, bias), upstream)):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.25, 1e-2)])
def test_label_smoothing_and_z_loss(backend, label_smoothing, z_loss):
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, bias, target = make_inputs(29, 24, 77, dtype)
    for reduction in ("mean", "none"):
        ours = fused_linear_cross_entropy(hidden, weight, target, bias, label_smoothing=label_smoothing,
                                          z_loss=z_loss, reduction=reduction, backend=backend)
        ref = naive_loss(hidden, weight, target, bias, label_smoothing=label_smoothing,
                         z_loss=z_loss, reduction=reduction)
        upstream = torch.randn_like(ref)
        torch.testing.assert_close(ours, ref, atol=_tol(dtype), rtol=_tol(dtype))
        for a, b in zip(grads(ours, (hidden, weight, bias), upstream),
                        grads(ref, (hidden, weight, bias), upstream)):
            torch.testing.assert_close(a, b, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_give_weighted_task_means(backend):
    """Σ_task coef·mean_task of a packed multi-task batch in one call with reduction='sum'."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, _, target = make_inputs(40, 16, 61, dtype, bias=False, ignore_every=7)
    task = torch.arange(40) % 3
    coef = torch.tensor([1.0, 0.5, 2.0], dtype=dtype)
    valid = target != -100
    counts = torch.stack([((task == k) & valid).sum() for k in range(3)]).to(dtype)
    token_weights = coef[task] / counts[task]
    ours = fused_linear_cross_entropy(hidden, weight, target, token_weights=token_weights,
                                      reduction="sum", backend=backend)
    expected = sum(coef[k] * F.cross_entropy(F.linear(hidden[task == k], weight), target[task == k])
                   for k in range(3))
    torch.testing.assert_close(ours, expected, atol=_tol(dtype), rtol=_tol(dtype))
    for a, b in zip(grads(ours, (hidden, weight), torch.tensor(1.0, dtype=dtype)),
                    grads(expected, (hidden, weight), torch.tensor(1.0, dtype=dtype))):
        torch.testing.assert_close(a, b, atol=_tol(dtype), rtol=_tol(dtype))
    # and the weighted mean follows PyTorch's Σw·l / Σw convention
    mean = fused_linear_cross_entropy(hidden, weight, target, token_weights=token_weights,
                                      backend=backend)
    torch.testing.assert_close(mean, naive_loss(hidden, weight, target, token_weights=token_weights),
                               atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_magnitude_logits(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, bias, target = make_inputs(19, 16, 70, dtype, scale=300.0)
    ours = fused_linear_cross_entropy(hidden, weight, target, bias, backend=backend)
    ref = naive_loss(hidden, weight, target, bias)
    assert torch.isfinite(ours)
    torch.testing.assert_close(ours, ref, atol=1e-3, rtol=1e-5)
    for a, b in zip(grads(ours, (hidden, weight, bias), torch.ones_like(ref)),
                    grads(ref, (hidden, weight, bias), torch.ones_like(ref))):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_and_leading_dims(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, bias, target = make_inputs(3 * 11, 16, 45, dtype, ignore_every=3)
    h3 = hidden.detach().reshape(3, 11, 16).requires_grad_()
    t3 = target.reshape(3, 11).clone()
    t3[t3 == -100] = 7  # a custom ignore index that is also a valid class id elsewhere
    t3[0, 0], t3[2, 4] = 7, 7
    ours = fused_linear_cross_entropy(h3, weight, t3, bias, ignore_index=7, reduction="none", backend=backend)
    ref = naive_loss(h3, weight, t3, bias, ignore_index=7, reduction="none")
    assert ours.shape == (3, 11)
    torch.testing.assert_close(ours, ref, atol=_tol(dtype), rtol=_tol(dtype))
    assert (ours[t3 == 7] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_rows(backend):
    dtype = torch.float32
    hidden, weight, bias, target = make_inputs(6, 8, 20, dtype)
    target.fill_(-100)
    total = fused_linear_cross_entropy(hidden, weight, target, bias, reduction="sum", backend=backend)
    assert total.item() == 0.0
    gh, gw, gb = grads(total, (hidden, weight, bias), torch.tensor(1.0))
    assert not gh.any() and not gw.any() and not gb.any()
    mean = fused_linear_cross_entropy(hidden, weight, target, bias, reduction="mean", backend=backend)
    ref = F.cross_entropy(F.linear(hidden, weight, bias), target)
    assert torch.isnan(mean) and torch.isnan(ref)  # PyTorch's 0/0 convention
    gh, gw, gb = grads(mean, (hidden, weight, bias), torch.tensor(1.0))
    assert not gh.any() and not gw.any() and not gb.any()  # zero, as PyTorch's


def test_reference_chunking_matches_naive():
    """Small row / vocabulary chunks exercise the block loops of both reference paths."""
    from unigen.kernels.fused_linear_cross_entropy import (
        reference_backward,
        reference_forward,
        reference_forward_reduced,
    )

    hidden, weight, bias, target = make_inputs(29, 12, 600, torch.float64)
    scale = torch.rand(29, dtype=torch.float64)
    ref_rows = naive_loss(hidden, weight, target, bias, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    rows, lse, _ = reference_forward(hidden, weight, bias, target, -100, 0.1, 1e-3, vocab_chunk=256)
    torch.testing.assert_close(rows, ref_rows)
    total, lse2, _, gh, gw, gb = reference_forward_reduced(
        hidden, weight, bias, target, scale, -100, 0.1, 1e-3, True, True, True, row_chunk=4)
    expected = (ref_rows * scale).sum()
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(lse2, lse)
    for a, b in zip((gh, gw, gb), grads(expected, (hidden, weight, bias), torch.tensor(1.0, dtype=torch.float64))):
        torch.testing.assert_close(a, b)
    g_rows = torch.randn(29, dtype=torch.float64)
    gh2, gw2, gb2 = reference_backward(g_rows, hidden, weight, bias, target, lse, -100, 0.1, 1e-3,
                                       True, True, True, vocab_chunk=256)
    ref_rows = naive_loss(hidden, weight, target, bias, label_smoothing=0.1, z_loss=1e-3, reduction="none")
    for a, b in zip((gh2, gw2, gb2), grads(ref_rows, (hidden, weight, bias), g_rows)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_with_gradient(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, bias, target = make_inputs(17, 8, 40, dtype)
    tw = torch.rand(17, dtype=dtype, requires_grad=True)
    ours = fused_linear_cross_entropy(hidden, weight, target, bias, token_weights=tw, backend=backend)
    ref = naive_loss(hidden, weight, target, bias, token_weights=tw)
    torch.testing.assert_close(ours, ref, atol=_tol(dtype), rtol=_tol(dtype))
    for a, b in zip(grads(ours, (hidden, weight, bias, tw), torch.tensor(1.0, dtype=dtype)),
                    grads(ref, (hidden, weight, bias, tw), torch.tensor(1.0, dtype=dtype))):
        torch.testing.assert_close(a, b, atol=_tol(dtype), rtol=_tol(dtype))


HALF_CASES = [(b, d) for b in BACKENDS for d in (torch.bfloat16, torch.float16)
              if b == "triton" or (b == "cpp" and d == torch.bfloat16)]


@pytest.mark.parametrize("backend,dtype", HALF_CASES)
def test_half_precision_error_within_2x_of_pytorch(backend, dtype):
    """Error against an fp64 reference at most ~2× that of the same-precision PyTorch formula
    (the C++ path upcasts fp16 and bf16 alike to fp32, so bf16 covers it)."""
    hidden, weight, bias, target = make_inputs(48, 32, 131, dtype, scale=2.0)
    exact_in = [x.detach().double().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    exact = naive_loss(*exact_in[:2], target, exact_in[2])
    exact_g = grads(exact, exact_in, torch.tensor(1.0, dtype=torch.float64))
    same = naive_loss(hidden, weight, target, bias)
    same_g = grads(same, (hidden, weight, bias), torch.tensor(1.0, dtype=dtype))
    ours = fused_linear_cross_entropy(hidden, weight, target, bias, backend=backend)
    assert ours.dtype == torch.float32  # the ops' output rule: fp32 losses for 16-bit inputs
    ours_g = grads(ours, (hidden, weight, bias), torch.tensor(1.0))
    err = lambda a, b: (a.double() - b).abs().max().item()
    assert err(ours, exact) <= 2 * err(same, exact) + 1e-3
    for o, s, e in zip(ours_g, same_g, exact_g):
        assert err(o, e) <= 2 * err(s, e) + 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats(backend):
    hidden, weight, bias, target = make_inputs(21, 16, 40, torch.float32)
    loss, stats = fused_linear_cross_entropy(hidden, weight, target, bias, backend=backend, return_stats=True)
    logits = F.linear(hidden, weight, bias).detach()
    valid = target != -100
    torch.testing.assert_close(stats.lse, torch.where(valid, torch.logsumexp(logits, -1), 0.0),
                               atol=2e-5, rtol=2e-5)
    assert torch.equal(stats.correct, valid & (logits.argmax(-1) == target))
    assert not stats.lse.requires_grad


def test_no_gradient_work_without_grad():
    hidden, weight, bias, target = make_inputs(9, 8, 20, torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, bias, backend="torch")
    assert not loss.requires_grad


def test_only_weight_requires_grad():
    hidden, weight, bias, target = make_inputs(9, 8, 20, torch.float64)
    hidden = hidden.detach()
    ours = fused_linear_cross_entropy(hidden, weight, target, backend="torch")
    ref = naive_loss(hidden, weight, target)
    (gw,) = torch.autograd.grad(ours, weight)
    (gw_ref,) = torch.autograd.grad(ref, weight)
    torch.testing.assert_close(gw, gw_ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduced_gradients_are_handed_over_without_a_copy(backend, reduction):
    """The reduced path computes its gradients in the forward; backward must hand those very
    buffers to .grad (scaled in place), not allocate a second set of gradient-sized tensors."""
    hidden, weight, bias, target = make_inputs(37, 19, 101, torch.float32)
    saved = []

    def pack(x):
        saved.append(x.data_ptr())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        ours = fused_linear_cross_entropy(hidden, weight, target, bias, reduction=reduction,
                                          backend=backend)
    (ours * 3.0).backward()
    for x in (hidden, weight, bias):
        assert x.grad.data_ptr() in saved
    ref = naive_loss(hidden, weight, target, bias, reduction=reduction) * 3.0
    expected = torch.autograd.grad(ref, (hidden, weight, bias))
    for x, e in zip((hidden, weight, bias), expected):
        torch.testing.assert_close(x.grad, e, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_loss_refuses_a_second_backward(backend):
    hidden, weight, bias, target = make_inputs(9, 8, 20, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()
    # the unreduced form supports it
    rows = fused_linear_cross_entropy(hidden, weight, target, bias, reduction="none", backend=backend)
    total = rows.sum()
    first = torch.autograd.grad(total, weight, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(total, weight)[0], first)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("wide_index", [False, True])
def test_triton_other_tiles_and_chunked_backward(monkeypatch, wide_index):
    """The Triton kernels of reduction="none" with tiles other than the default (as the GPU tile
    sweep runs them), a dZ budget that forces many vocabulary chunks, interleaved ignored rows, and the 64-bit
    offsets that tensors of 2^31+ elements switch on."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    if not flce.triton_interpreting():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    monkeypatch.setattr(flce, "_wide_index", lambda *tensors: wide_index)
    hidden, weight, bias, target = make_inputs(45, 24, 203, torch.float32, ignore_every=3)
    monkeypatch.setattr(flce, "DZ_BUDGET_BYTES", 45 * 4 * 40)  # 40 columns -> 32-wide chunks
    assert flce._backward_vocab_chunk(45, 203, 4, 16) == 32  # 7 chunks, the last one narrower
    cfg = dict(BLOCK_N=32, BLOCK_V=16, BLOCK_D=32)
    g_rows = torch.linspace(0.5, 1.5, 45, dtype=torch.float32)
    args = (hidden.detach(), weight.detach(), bias.detach(), target)
    rows, lse, _ = flce.triton_forward(*args, -100, 0.1, 1e-3, config=cfg)
    gh, gw, gb = flce.triton_backward(g_rows, *args, lse, -100, 0.1, 1e-3, True, True, True,
                                      config=cfg)
    ref = naive_loss(hidden, weight, target, bias, label_smoothing=0.1, z_loss=1e-3,
                     reduction="none")
    torch.testing.assert_close(rows, ref.detach(), atol=2e-5, rtol=2e-5)
    for ours, e in zip((gh, gw, gb), torch.autograd.grad(ref, (hidden, weight, bias), g_rows)):
        torch.testing.assert_close(ours, e, atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="unknown Triton config keys"):
        flce._triton_config({"BLOCK_K": 32})


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [(0.0, 0.0, None, False), (0.1, 1e-3, 3.0, True)],
                         ids=lambda o: f"ls{o[0]}-z{o[1]}-cap{o[2]}-b{o[3]}")
def test_none_path_gpu_tiles_under_interpreter(dtype, options):
    """The 16-bit GPU pick of ``_triton_config`` (128×128×32 tiles; GROUP_M, which the pick
    takes from D, set to 8 here) run by the interpreter: 1078 valid rows of 1100 fill 9 row
    blocks, a full group of 8 and a partial one
    (the valid rows sort first: the ninth block holds 54), D = 40 ends in
    a partial K step, V = 203 in a partial vocabulary tile, ignored rows interleaved. Row losses,
    lse and all three gradients within 2× of PyTorch's same-precision error (fp64 reference)."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    if not flce.triton_interpreting():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    cfg = dict(flce._select_config(dtype, 40, interpreting=False))
    assert (cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_D"]) == (128, 128, 32)
    assert cfg["GROUP_M"] == flce.cost_model.group_rows(40, 2) == 64
    cfg["GROUP_M"] = 8
    ls, zl, cap, with_bias = options
    hidden, weight, bias, target = make_inputs(1100, 40, 203, dtype, bias=with_bias, ignore_every=50,
                                               scale=2.0)
    g_rows = torch.rand(1100, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    args = (hidden.detach(), weight.detach(), bias.detach() if with_bias else None, target)
    rows, lse, _ = flce.triton_forward(*args, -100, ls, zl, cap or 0.0, config=cfg)
    ours_g = flce.triton_backward(g_rows.float(), *args, lse, -100, ls, zl, True, True, with_bias,
                                  cap or 0.0, config=cfg)
    valid = target != -100

    def formula(h, w, b):
        logits = F.linear(h, w, b)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        out = F.cross_entropy(logits, target, label_smoothing=ls, reduction="none")
        lse = torch.where(valid, torch.logsumexp(logits.double(), -1), 0.0)
        return out + zl * lse.to(out.dtype) ** 2, lse

    inputs = [x for x in (hidden, weight, bias) if x is not None]
    exact_in = [x.detach().double().requires_grad_() for x in inputs]
    exact, exact_lse = formula(*exact_in, *([None] if not with_bias else []))
    exact_g = torch.autograd.grad(exact, exact_in, g_rows)
    same, _ = formula(*inputs, *([None] if not with_bias else []))
    same_g = torch.autograd.grad(same, inputs, g_rows.to(dtype))
    err = lambda a, e: (a.double() - e).abs().max().item()
    torch.testing.assert_close(lse.double(), exact_lse, atol=2e-2, rtol=1e-2)
    assert err(rows, exact) <= 2 * err(same, exact) + 1e-3
    for o, sg, e in zip([g for g in ours_g if g is not None], same_g, exact_g):
        assert err(o, e) <= 2 * err(sg, e) + 1e-4


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("name", ["n128v128d16g8w8s4", "n64v128d32g8w8s3", "n64v128d64g1w8s3"])
def test_tile_sweep_candidates_under_interpreter(name):
    """The other tiles the GPU sweep times (the default's is tested above) compute the same
    rows and gradients: fp32, 300 rows (3 or 5 row blocks, partial groups), partial K and V tiles."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    if not flce.triton_interpreting():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    cfg = flce.TILE_CANDIDATES[name]
    hidden, weight, bias, target = make_inputs(300, 40, 203, torch.float32, ignore_every=9)
    g_rows = torch.linspace(0.5, 1.5, 300, dtype=torch.float32)
    args = (hidden.detach(), weight.detach(), bias.detach(), target)
    rows, lse, _ = flce.triton_forward(*args, -100, 0.1, 1e-3, config=cfg)
    ours_g = flce.triton_backward(g_rows, *args, lse, -100, 0.1, 1e-3, True, True, True, config=cfg)
    ref = naive_loss(hidden, weight, target, bias, label_smoothing=0.1, z_loss=1e-3,
                     reduction="none")
    torch.testing.assert_close(rows, ref.detach(), atol=2e-5, rtol=2e-5)
    for ours, e in zip(ours_g, torch.autograd.grad(ref, (hidden, weight, bias), g_rows)):
        torch.testing.assert_close(ours, e, atol=2e-5, rtol=2e-5)


def test_triton_config_is_cached_per_shape_class():
    """One pick per (dtype width, D class, D), computed once; callers get copies, overrides are
    checked by name. 16-bit picks take GROUP_M from D (the rows of H a group shares in L2)."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    a = flce._select_config(torch.bfloat16, 768, interpreting=False)
    assert flce._select_config(torch.float16, 768, interpreting=False) is a  # one 16-bit class
    assert flce._select_config(torch.bfloat16, 768, interpreting=False) is a
    assert (a["GROUP_M"], flce._select_config(torch.float16, 4096, interpreting=False)["GROUP_M"]
            ) == (64, 16)
    assert flce._select_config(torch.float32, 768, interpreting=False) is not a
    assert flce._select_config(torch.bfloat16, 24, interpreting=False)["BLOCK_D"] == 16
    stages = flce._triton_config(None, torch.bfloat16, 768)["num_stages"]
    assert flce._triton_config({"num_stages": stages + 1}, torch.bfloat16, 768)["num_stages"] == stages + 1
    assert flce._triton_config(None, torch.bfloat16, 768)["num_stages"] == stages  # cache untouched
    for name, candidate in flce.TILE_CANDIDATES.items():  # every candidate is a valid override
        assert set(candidate) == set(flce._triton_config()), name


def _capped_reference(hidden, weight, target, bias, cap, label_smoothing, z_loss, token_weights,
                      reduction):
    """The naive formula on fp64 copies, soft-capped when ``cap`` (Gemma 2's order of steps)."""
    h, w, b = (x.detach().double().requires_grad_() if x is not None else None
               for x in (hidden, weight, bias))
    logits = F.linear(h, w, b)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    valid = target != -100
    rows = F.cross_entropy(logits, target, label_smoothing=label_smoothing, reduction="none")
    rows = rows + z_loss * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
    tw = token_weights.double()
    total = (rows * tw).sum()
    loss = total if reduction == "sum" else total / torch.where(valid, tw, 0.0).sum()
    return loss, (h, w, b), torch.where(valid, torch.logsumexp(logits, -1), 0.0), logits


REDUCED_OPTIONS = [  # (label_smoothing, z_loss, softcap, bias)
    (0.0, 0.0, None, False), (0.1, 1e-3, None, True), (0.25, 1e-2, 4.0, True), (0.0, 0.0, 2.0, False)]


# the torch reference upcasts 16-bit inputs (fp32 covers it); the C++ op has its own row blocks.
# The Triton path in both strategies of its cost model (launch.triton_forward_reduced).
REDUCED_CASES = [("torch", torch.float32, None)] + [
    ("triton", d, s) for s in ("rows", "vocab_chunks")
    for d in (torch.float32, torch.bfloat16, torch.float16) if "triton" in BACKENDS]


@pytest.mark.parametrize("backend,dtype,strategy", REDUCED_CASES, ids=str)
@pytest.mark.parametrize("options", REDUCED_OPTIONS, ids=lambda o: f"ls{o[0]}-z{o[1]}-cap{o[2]}-b{o[3]}")
def test_reduced_row_blocks_match_reference(monkeypatch, backend, dtype, strategy, options):
    """The "mean"/"sum" path over many 16-row blocks (the Triton row kernel runs under
    TRITON_INTERPRET=1) or, in the Triton path's other strategy, many small vocabulary chunks:
    odd shapes, interleaved ignored rows (some blocks all ignored on the Triton path, whose
    valid rows sort first), token weights, every loss option; values, gradients and statistics
    against an fp64 reference, fp16/bf16 within 2× of PyTorch's own same-precision error."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    if backend == "triton" and not flce.triton_interpreting():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    monkeypatch.setattr(flce, "REDUCED_STRATEGY", strategy)
    monkeypatch.setattr(flce, "REDUCED_WORKING_BYTES", 0)
    monkeypatch.setattr(flce, "MIN_ROW_BLOCK", 16)
    cpu_path = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.cpu")
    monkeypatch.setattr(cpu_path, "REDUCED_CPU_BLOCK_BYTES", 0)
    ls, zl, cap, with_bias = options
    hidden, weight, bias, target = make_inputs(61, 19, 203, dtype, bias=with_bias, ignore_every=3,
                                               scale=2.0)
    target[40:] = -100  # the tail blocks of the Triton path hold only ignored rows
    tw = torch.rand(61, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    inputs = [x for x in (hidden, weight, bias) if x is not None]
    for reduction in ("sum", "mean"):
        loss, stats = fused_linear_cross_entropy(
            hidden, weight, target, bias, label_smoothing=ls, z_loss=zl, softcap=cap,
            token_weights=tw, reduction=reduction, backend=backend, return_stats=True)
        exact, exact_in, exact_lse, exact_logits = _capped_reference(
            hidden, weight, target, bias, cap, ls, zl, tw, reduction)
        exact_g = torch.autograd.grad(exact, [x for x in exact_in if x is not None])
        ours_g = torch.autograd.grad(loss, inputs)
        valid = target != -100
        assert torch.equal(stats.correct, valid & (exact_logits.argmax(-1) == target))
        if dtype == torch.float32:
            torch.testing.assert_close(loss.double(), exact, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(stats.lse.double(), exact_lse, atol=2e-5, rtol=2e-5)
            for o, e in zip(ours_g, exact_g):
                torch.testing.assert_close(o.double(), e, atol=2e-5, rtol=2e-5)
            continue
        # the same formula in the inputs' precision (PyTorch's own 16-bit computation)
        logits = F.linear(hidden, weight, bias)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        rows = F.cross_entropy(logits, target, label_smoothing=ls, reduction="none")
        rows = rows + zl * torch.where(valid, torch.logsumexp(logits, -1) ** 2, 0.0)
        same = (rows * tw).sum()
        same = same if reduction == "sum" else same / torch.where(valid, tw, 0.0).sum()
        same_g = torch.autograd.grad(same, inputs)
        err = lambda a, e: (a.double() - e).abs().max().item()
        assert err(loss, exact) <= 2 * err(same, exact) + 1e-3
        for o, s, e in zip(ours_g, same_g, exact_g):
            assert err(o, e) <= 2 * err(s, e) + 1e-4


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_reduced_row_blocks_under_autocast_keep_fp32_logits(monkeypatch):
    """Under autocast the row-chunked Triton path writes fp32 logits and narrows the gradient
    to bf16 in place, block after block: the loss agrees to fp32 accuracy with fp32 math on the
    cast inputs, the gradients to bf16 accuracy."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    if not flce.triton_interpreting():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    monkeypatch.setattr(flce, "REDUCED_STRATEGY", "rows")
    monkeypatch.setattr(flce, "REDUCED_WORKING_BYTES", 0)
    monkeypatch.setattr(flce, "MIN_ROW_BLOCK", 16)
    hidden, weight, bias, target = make_inputs(53, 24, 203, torch.float32, ignore_every=4)
    for cap in (None, 3.0):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_linear_cross_entropy(hidden, weight, target, bias, label_smoothing=0.1,
                                              softcap=cap, backend="triton")
        assert loss.dtype == torch.float32
        exact, exact_in, _, _ = _capped_reference(
            *(x.detach().bfloat16() for x in (hidden, weight)), target, bias.detach().bfloat16(),
            cap, 0.1, 0.0, torch.ones(53), "mean")
        torch.testing.assert_close(loss.double(), exact, atol=2e-6, rtol=2e-6)
        for o, e in zip(torch.autograd.grad(loss, (hidden, weight, bias)),
                        torch.autograd.grad(exact, exact_in)):
            torch.testing.assert_close(o.double(), e, atol=1e-2 * e.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cpp"])
def test_stats_only_when_asked(backend):
    """Without return_stats neither op computes the argmax (its statistic comes back empty);
    with it, both return the same lse and correctness."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    if backend == "triton" and not flce.triton_interpreting():
        pytest.skip("runs the kernels under TRITON_INTERPRET=1")
    hidden, weight, bias, target = make_inputs(21, 16, 40, torch.float32)
    args = (hidden.detach(), weight.detach(), bias.detach(), target)
    scale = torch.ones(21)
    outs = {}
    for stats in (False, True):
        reduced = torch.ops.unigen.flce_forward_reduced(*args, scale, -100, 0.0, 0.0, 0.0, backend,
                                                        False, False, False, stats=stats)
        rows = torch.ops.unigen.flce_forward(*args, -100, 0.0, 0.0, 0.0, backend, stats=stats)
        assert reduced[2].numel() == rows[2].numel() == (21 if stats else 0)
        outs[stats] = reduced[1], rows[1]
    logits = F.linear(hidden, weight, bias).detach()
    valid = target != -100
    assert torch.equal(reduced[2], valid & (logits.argmax(-1) == target))
    assert torch.equal(rows[2], reduced[2])
    for a, b in zip(outs[False], outs[True]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduced_loss_refuses_double_backward(backend):
    """create_graph=True through the reduced path would differentiate gradients that are
    constants of the forward: a clear error instead of silently wrong second derivatives."""
    hidden, weight, bias, target = make_inputs(9, 8, 20, torch.float32)
    loss = fused_linear_cross_entropy(hidden, weight, target, bias, backend=backend)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_accumulate_mm_in_row_blocks(monkeypatch):
    """dH += dZ·W for bf16 chunks accumulates in fp32 without an [N, D] temporary (row blocks
    off CUDA): the same values as one fp32 product of the bf16 operands."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    monkeypatch.setattr(flce, "_ACCUMULATE_ROWS", 7)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 12, generator=g).bfloat16()
    b = torch.randn(12, 9, generator=g).bfloat16()
    acc = torch.randn(30, 9, generator=g)
    expected = acc + a.float() @ b.float()
    flce._accumulate_mm(acc, a, b)
    torch.testing.assert_close(acc, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.gpu
def test_accumulate_mm_on_cuda():
    """The CUDA path: cuBLAS accumulating into the fp32 buffer itself (addmm with out_dtype and
    out aliasing the input), or the row-block fallback on an older torch: both exact to fp32."""
    import importlib

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(5000, 512, device="cuda", generator=g).bfloat16()
    b = torch.randn(512, 96, device="cuda", generator=g).bfloat16()
    acc = torch.randn(5000, 96, device="cuda", generator=g)
    expected = acc + a.float() @ b.float()
    ptr = acc.data_ptr()
    flce._accumulate_mm(acc, a, b)
    assert acc.data_ptr() == ptr
    print("fp32-output addmm used:", flce._ADDMM_FP32_OUT)
    torch.testing.assert_close(acc, expected, atol=0.1, rtol=1e-2)


def test_module_matches_functional():
    hidden, weight, bias, target = make_inputs(13, 8, 30, torch.float64)
    module = FusedLinearCrossEntropyLoss(label_smoothing=0.1, backend="torch")
    torch.testing.assert_close(module(hidden, weight, target, bias),
                               naive_loss(hidden, weight, target, bias, label_smoothing=0.1))
    assert "label_smoothing=0.1" in repr(module)


def test_torch_compile_without_graph_break():
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.out = torch.nn.Linear(8, 30, bias=False)
            self.loss = FusedLinearCrossEntropyLoss(backend="torch")

        def forward(self, x, y):
            return self.loss(torch.tanh(self.proj(x)), self.out.weight, y)

    torch._dynamo.reset()
    model = Head()
    x, y = torch.randn(12, 8), torch.randint(0, 30, (12,))
    eager = model(x, y)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    torch.testing.assert_close(out, eager)
    out.backward()
    assert model.out.weight.grad is not None


@pytest.mark.skipif(not cpp_ops_available(), reason="unigen._C not built")
def test_opcheck_cpp_op():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 16, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (8,), generator=g)
    t[0] = -100
    op = torch.ops.unigen.fused_linear_cross_entropy.default
    torch.library.opcheck(op, (h, w, b, t, -100, 0.1, 0.01, 0.0))
    torch.library.opcheck(op, (h, w, b, t, -100, 0.0, 0.0, 2.0))  # soft-capped
    torch.library.opcheck(op, (h.detach(), w.detach(), None, t, -100, 0.0, 0.0, 0.0))
    scale = torch.rand(8, dtype=torch.float64, generator=g)
    reduced = torch.ops.unigen.fused_linear_cross_entropy_reduced.default
    torch.library.opcheck(reduced, (h, w, b, t, scale, -100, 0.1, 0.01, 2.0, [True, True, True]))
    torch.library.opcheck(reduced, (h.detach(), w.detach(), None, t, scale, -100, 0.0, 0.0, 0.0, [False, False, False]))


def test_opcheck_python_op():
    h = torch.randn(8, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (8,))
    torch.library.opcheck(torch.ops.unigen.flce_forward.default, (h, w, None, t, -100, 0.0, 0.0, 0.0, "torch"))
    scale = torch.rand(8, dtype=torch.float64)
    torch.library.opcheck(torch.ops.unigen.flce_forward_reduced.default,
                          (h, w, None, t, scale, -100, 0.1, 0.0, 2.0, "torch", True, True, False))


@pytest.mark.parametrize("bad,match", [
    (dict(weight=torch.randn(30, 9)), "hidden has last dimension"),
    (dict(target=torch.randint(0, 30, (5,))), "target shape"),
    (dict(target=torch.tensor([0, 1, 2, 30, 4, 5, 6, 7, 8, 9, 10, 11])), r"target values must be in \[0, 30\)"),
    (dict(target=torch.tensor([0, 1, 2, -3, 4, 5, 6, 7, 8, 9, 10, 11])), r"target values"),
    (dict(target=torch.zeros(12)), "target must have dtype"),
    (dict(weight=torch.randn(30, 8, dtype=torch.float64)), "weight dtype"),
    (dict(bias=torch.randn(29)), "bias has 29 entries"),
    (dict(token_weights=torch.ones(11)), "token_weights shape"),
    (dict(reduction="avg"), "reduction must be one of"),
    (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(z_loss=-1.0), "z_loss"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_inputs(bad, match):
    args = dict(hidden=torch.randn(12, 8), weight=torch.randn(30, 8), target=torch.randint(0, 30, (12,)))
    kwargs = {k: bad.pop(k) for k in list(bad) if k not in args}
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_cross_entropy(args["hidden"], args["weight"], args["target"], **kwargs)


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        fused_linear_cross_entropy(torch.randn(0, 8), torch.randn(30, 8), torch.zeros(0, dtype=torch.long))


def test_triton_rejects_fp64_and_cpu_without_interpreter(monkeypatch):
    h, w = torch.randn(4, 8, dtype=torch.float64), torch.randn(30, 8, dtype=torch.float64)
    t = torch.zeros(4, dtype=torch.long)
    if triton_available():
        with pytest.raises(TypeError, match="float64"):
            fused_linear_cross_entropy(h, w, t, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fused_linear_cross_entropy(h.float(), w.float(), t, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_no_host_sync(reduction, no_host_sync):
    """Forward and backward on CUDA, with ignored rows, token weights and every option, never
    synchronise the host with the device (after a warm-up that compiles the kernels)."""
    h = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (300,), device="cuda")
    t[::4] = -100
    tw = torch.rand(300, device="cuda")

    def step():
        loss = fused_linear_cross_entropy(h, w, t, b, label_smoothing=0.1, z_loss=1e-4,
                                          token_weights=tw, reduction=reduction)
        return torch.autograd.grad(loss.sum(), (h, w, b))

    step()
    with no_host_sync():
        grads = step()
    assert all(g.is_cuda for g in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_triton_matches_reference(dtype):
    h, w, b = (x.detach().cuda().requires_grad_()
               for x in make_inputs(1000, 256, 5003, dtype, scale=2.0)[:3])
    t = torch.randint(0, 5003, (1000,), device="cuda")
    t[::3] = -100
    ours = fused_linear_cross_entropy(h, w, t, b, label_smoothing=0.1, z_loss=1e-4, backend="triton")
    exact_in = [x.detach().double().requires_grad_() for x in (h, w, b)]
    exact = naive_loss(*exact_in[:2], t, exact_in[2], label_smoothing=0.1, z_loss=1e-4)
    same = naive_loss(h, w, t, b, label_smoothing=0.1, z_loss=1e-4)
    err = lambda a, e: (a.double() - e).abs().max().item()
    assert err(ours, exact) <= 2 * err(same, exact) + 1e-5
    og = grads(ours, (h, w, b), torch.tensor(1.0, device="cuda", dtype=dtype))
    sg = grads(same, (h, w, b), torch.tensor(1.0, device="cuda", dtype=dtype))
    eg = grads(exact, exact_in, torch.tensor(1.0, device="cuda", dtype=torch.float64))
    for o, s, e in zip(og, sg, eg):
        assert err(o, e) <= 2 * err(s, e) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["rows", "vocab_chunks"])
def test_cuda_headline_mean_matches_reference(strategy, monkeypatch):
    """The headline call, ``fused_linear_cross_entropy(h, W, y)`` in bf16 (mean, no bias, no
    options), in each strategy of the cost model with several blocks or chunks: the loss and
    both gradients within 2× of PyTorch's bf16 error against fp64, dW at or below it (relative
    Frobenius error)."""
    import importlib

    flce = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")
    monkeypatch.setattr(flce, "REDUCED_STRATEGY", strategy)
    monkeypatch.setattr(flce, "REDUCED_WORKING_BYTES", 8.5 * 2**20)  # 4 blocks / 4 chunks
    h, w = (x.detach().cuda().requires_grad_() for x in make_inputs(2000, 256, 5003, torch.bfloat16,
                                                                     scale=2.0)[:2])
    t = torch.randint(0, 5003, (2000,), device="cuda")
    t[::7] = -100
    ours = fused_linear_cross_entropy(h, w, t)
    exact_in = [x.detach().double().requires_grad_() for x in (h, w)]
    exact = naive_loss(*exact_in, t)
    same = naive_loss(h, w, t)
    err = lambda a, e: (a.double() - e).abs().max().item()
    assert err(ours, exact) <= 2 * err(same, exact) + 1e-5
    og, sg, eg = (torch.autograd.grad(x, inputs) for x, inputs in
                  ((ours, (h, w)), (same, (h, w)), (exact, exact_in)))
    for o, s_, e in zip(og, sg, eg):
        assert err(o, e) <= 2 * err(s_, e) + 1e-6
    rel = lambda a, e: ((a.double() - e).norm() / e.norm()).item()
    assert rel(og[1], eg[1]) <= rel(sg[1], eg[1])


# --------------------------------------------------------------------------------------------
# a weight freed after the forward (FSDP2 resharding) and brought back before the backward
# --------------------------------------------------------------------------------------------


def _free(weight):
    """What FSDP2's reshard does to an unsharded parameter: its storage shrinks to nothing."""
    saved = weight.detach().clone()
    weight.untyped_storage().resize_(0)
    return saved


def _restore(weight, saved):
    """What FSDP2's pre-backward all-gather does: the same storage, grown back and refilled."""
    weight.untyped_storage().resize_(saved.numel() * saved.element_size())
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(weight):
        weight.copy_(saved)  # FSDP2 keeps the version too: the saved tensor is still the one


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_freed_after_forward_and_gathered_back_gives_the_gradients(backend):
    hidden, weight, bias, target = make_inputs(23, 16, 61, torch.float32, seed=4)
    upstream = torch.randn(23, generator=torch.Generator().manual_seed(1))
    expected = grads(naive_loss(hidden, weight, target, bias, reduction="none"), (hidden, weight, bias),
                     upstream)
    rows = fused_linear_cross_entropy(hidden, weight, target, bias, reduction="none", backend=backend)
    _restore(weight, _free(weight))
    got = grads(rows, (hidden, weight, bias), upstream)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=_tol(torch.float32), atol=_tol(torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("freed", ["weight", "bias"])
def test_weight_still_freed_at_backward_is_refused_naming_the_cause(backend, freed):
    hidden, weight, bias, target = make_inputs(9, 8, 33, torch.float32, seed=5)
    rows = fused_linear_cross_entropy(hidden, weight, target, bias, reduction="none", backend=backend)
    _free(weight if freed == "weight" else bias)
    with pytest.raises(RuntimeError, match=f"the {freed} saved for backward was freed.*FSDP2"):
        rows.sum().backward()
