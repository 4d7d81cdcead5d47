"""ClipLoss: open_clip's ClipLoss contract on the fused contrastive op. The reference is open_clip's
formula written out here (open_clip is not a test dependency)."""

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from unigen.kernels import ClipLoss
from unigen.kernels.common.backend import triton_available

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_clip_loss_dist_worker.py")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="needs triton"))]


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # the launchers' module, which reads the tiles
    cl = importlib.import_module("unigen.kernels.contrastive_loss.launch")
    monkeypatch.setattr(cl, "_BLOCK_OVERRIDE", (16, 16))  # interpreter: small tiles are fast


def open_clip_formula(image, text, logit_scale, logit_bias=None):
    """open_clip's single-process ClipLoss."""
    per_image = logit_scale * image @ text.T
    per_text = logit_scale * text @ image.T
    if logit_bias is not None:
        per_image = per_image + logit_bias
        per_text = per_text + logit_bias
    labels = torch.arange(image.shape[0])
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def _features(n=19, d=24, dtype=torch.float64, normalized=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)
    if normalized:  # what open_clip's models hand the loss
        image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    return image, text


def _loss_and_grads(fn, image, text, scale, *extra):
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
              torch.tensor(scale, dtype=image.dtype, requires_grad=True)]
    extra = [x.clone().requires_grad_() for x in extra]
    loss = fn(*leaves, *extra)
    return loss.detach(), torch.autograd.grad(loss, leaves + extra)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalized", [True, False])
def test_matches_open_clip_formula(backend, normalized):
    # not normalised too: the op runs on raw dot products (open_clip never renormalises), so even the
    # radial part of the feature gradient is the formula's
    image, text = _features(normalized=normalized)
    loss, grads = _loss_and_grads(ClipLoss(backend=backend), image, text, 14.0)
    ref, ref_grads = _loss_and_grads(open_clip_formula, image, text, 14.0)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_within_formula_precision(backend):
    image, text = _features(n=33, d=16, dtype=torch.float32)
    loss, grads = _loss_and_grads(ClipLoss(backend=backend), image, text, 30.0)
    exact, exact_grads = _loss_and_grads(open_clip_formula, image.double(), text.double(), 30.0)
    ref, ref_grads = _loss_and_grads(open_clip_formula, image, text, 30.0)
    assert (loss.double() - exact).abs() <= 2 * (ref.double() - exact).abs() + 1e-6
    for g, e, r in zip(grads, exact_grads, ref_grads):
        assert (g.double() - e).abs().max() <= 2 * (r.double() - e).abs().max() + 1e-6


def test_output_dict_and_logit_bias():
    image, text = _features()
    loss = ClipLoss()
    out = loss(image, text, torch.tensor(10.0, dtype=torch.float64), output_dict=True)
    assert set(out) == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], open_clip_formula(image, text, 10.0))
    # a one-value bias: the fused op (the bias shifts whole rows: no effect, zero gradient)
    bias = torch.tensor(-3.0, dtype=torch.float64)
    value, grads = _loss_and_grads(loss, image, text, 10.0, bias)
    ref, ref_grads = _loss_and_grads(open_clip_formula, image, text, 10.0, bias)
    torch.testing.assert_close(value, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-8)
    assert grads[-1].item() == 0.0
    # a per-logit bias is not a row shift: the formula runs, and agrees with itself
    matrix_bias = torch.randn(19, 19, dtype=torch.float64)
    value, grads = _loss_and_grads(loss, image, text, 10.0, matrix_bias)
    ref, ref_grads = _loss_and_grads(open_clip_formula, image, text, 10.0, matrix_bias)
    torch.testing.assert_close(value, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hardest_negatives_returned(backend):
    image, text = _features()
    scale = torch.tensor(10.0, dtype=torch.float64)
    loss, neg_text, neg_image = ClipLoss(negatives="hardest", backend=backend)(image, text, scale)
    torch.testing.assert_close(loss, open_clip_formula(image, text, scale))
    sim = (image @ text.T).fill_diagonal_(float("-inf"))
    assert torch.equal(neg_text, sim.argmax(1)) and torch.equal(neg_image, sim.T.argmax(1))
    out = ClipLoss(negatives="sample", backend=backend)(image, text, scale, output_dict=True)
    assert set(out) == {"contrastive_loss", "neg_text_for_image", "neg_image_for_text"}
    assert (out["neg_text_for_image"] != torch.arange(19)).all()


def test_bf16_autocast():
    image, text = _features(dtype=torch.float32)
    scale = torch.tensor(20.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ClipLoss()(image, text, scale)
    assert loss.dtype == torch.float32
    # the rule: the features are cast to bf16 at entry, the math is fp32
    ref = open_clip_formula(image.bfloat16().double(), text.bfloat16().double(), 20.0)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="negatives must be"):
        ClipLoss(negatives="all")
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        ClipLoss(rank=2, world_size=2)
    image, text = _features()
    scale = torch.tensor(10.0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        ClipLoss(rank=0, world_size=2)(image, text, scale)
    with pytest.raises(TypeError, match="logit_bias must be a tensor or None.*output_dict by keyword"):
        ClipLoss()(image, text, scale, True)
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(image, text[:-1], scale)
    with pytest.raises(ValueError, match="logit_scale must be a one-element tensor"):
        ClipLoss()(image, text, 10.0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.timeout(300)
def test_two_process_gloo_every_mode_matches_open_clip(backend):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, WORKER, backend], env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"distributed ClipLoss OK ({backend})" in proc.stdout


def test_traces_under_torch_compile_without_graph_breaks():
    image, text = _features(dtype=torch.float32)
    scale = torch.tensor(10.0, requires_grad=True)
    loss_fn = ClipLoss(backend="torch")
    eager = loss_fn(image, text, scale)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    loss = compiled(image, text, scale)
    torch.testing.assert_close(loss, eager)
    (g,) = torch.autograd.grad(loss, scale)
    torch.testing.assert_close(g, torch.autograd.grad(eager, scale)[0])
    torch._dynamo.reset()
