"""contrastive_loss: values, gradients and mined negatives against the readable reference.

The Triton path runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1) on tiny
shapes with 16×16 tiles, so every case spans several row and column blocks with ragged edges.
"""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from unigen.kernels import ContrastiveLoss, contrastive_loss
from unigen.kernels.common.backend import triton_available
from unigen.kernels.contrastive_loss import contrastive_loss_reference

# the launchers read the tile and split overrides; the op holds the custom op and the Function
cl_launch = importlib.import_module("unigen.kernels.contrastive_loss.launch")
cl_op = importlib.import_module("unigen.kernels.contrastive_loss.op")

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="needs triton"))]
# (atol, rtol) against the fp64 reference, per input dtype.
TOL = {torch.float64: (1e-10, 1e-8), torch.float32: (2e-5, 2e-4),
       torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # 16×16 tiles on tiny batches: several blocks per direction and partial edge blocks, and
    # each sweep split in two (as larger batches are on a GPU), so split merging is always on.
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", (16, 16))
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", 2)


def _inputs(n, d, dtype, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    txt = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     requires_grad=True)
    return img, txt, s


def _reference_grads(img, txt, s, **kw):
    # The reference in fp64 on the same (rounded) inputs is the ground truth for every dtype.
    i64 = img.detach().double().requires_grad_()
    t64 = txt.detach().double().requires_grad_()
    s64 = s.detach().double().requires_grad_()
    ref = contrastive_loss_reference(i64, t64, s64, negatives="hardest", **kw)
    return ref, torch.autograd.grad(ref.loss, (i64, t64, s64))


def _assert_close(actual, expected, dtype, what):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=what)


CASES = [  # (n, d, label_smoothing, with_ids): every option on a ragged 3×3-block shape, then
    # the smallest batch and a feature dim below one 16-wide tile.
    (37, 40, 0.0, False), (37, 40, 0.1, False), (37, 40, 0.0, True), (37, 40, 0.1, True),
    (2, 16, 0.1, True), (33, 5, 0.0, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d,label_smoothing,with_ids", CASES)
def test_loss_and_grads_match_reference(backend, dtype, n, d, label_smoothing, with_ids):
    img, txt, s = _inputs(n, d, dtype)
    ids = torch.randint(0, max(1, n // 2), (n,), generator=torch.Generator().manual_seed(1)) if with_ids else None
    out = contrastive_loss(img, txt, s, ids=ids, label_smoothing=label_smoothing,
                           negatives="hardest", backend=backend)
    ref, ref_grads = _reference_grads(img, txt, s, ids=ids, label_smoothing=label_smoothing)
    grads = torch.autograd.grad(out.loss, (img, txt, s))
    _assert_close(out.loss, ref.loss, dtype, "loss")
    for name, g, rg in zip(("image_feats", "text_feats", "logit_scale"), grads, ref_grads):
        assert g.dtype == (img.dtype if name != "logit_scale" else s.dtype)
        _assert_close(g, rg, dtype, f"grad {name}")
    # "hardest" is deterministic: the argmax over the non-positives.
    assert torch.equal(out.neg_text_for_image, ref.neg_text_for_image)
    assert torch.equal(out.neg_image_for_text, ref.neg_image_for_text)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(backend, dtype):
    img, txt, s = _inputs(35, 24, dtype, scale=10.0)
    out = contrastive_loss(img, txt, s, negatives=None, backend=backend)
    grads = torch.autograd.grad(out.loss, (img, txt, s))
    ref, ref_grads = _reference_grads(img, txt, s)
    assert out.loss.dtype == torch.float32 and grads[0].dtype == dtype
    _assert_close(out.loss, ref.loss, dtype, "loss")
    for g, rg in zip(grads, ref_grads):
        _assert_close(g, rg, dtype, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_matches_open_clip_style_formula(backend, label_smoothing):
    """The textbook CLIP loss: (CE(logits, arange) + CE(logits.T, arange)) / 2 on normalised
    features, written here independently of the reference."""
    img, txt, s = _inputs(29, 20, torch.float32, scale=14.0)
    out = contrastive_loss(img, txt, s, negatives=None, label_smoothing=label_smoothing, backend=backend)
    i64, t64, s64 = (x.detach().double().requires_grad_() for x in (img, txt, s))
    logits = s64 * F.normalize(i64, dim=-1) @ F.normalize(t64, dim=-1).t()
    labels = torch.arange(29)
    expected = 0.5 * (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                      + F.cross_entropy(logits.t(), labels, label_smoothing=label_smoothing))
    torch.testing.assert_close(out.loss.double(), expected, atol=2e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(out.loss, (img, txt, s)),
                     torch.autograd.grad(expected, (i64, t64, s64))):
        torch.testing.assert_close(g.double(), rg, atol=2e-6, rtol=1e-4)


def test_reference_with_distinct_ids_equals_no_ids():
    img, txt, s = _inputs(12, 8, torch.float64)
    a = contrastive_loss_reference(img, txt, s, ids=torch.arange(100, 112), negatives="hardest")
    b = contrastive_loss_reference(img, txt, s, negatives="hardest")
    torch.testing.assert_close(a.loss, b.loss)
    assert torch.equal(a.neg_text_for_image, b.neg_text_for_image)


def test_reference_multi_positive_targets():
    """With ids, row i's target is uniform over the pairs sharing its id (BLIP's sim_targets)."""
    img, txt, s = _inputs(6, 4, torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    logits = s * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    expected = 0.0
    for lg in (logits, logits.t()):
        for i in range(6):
            pos = (ids == ids[i]).nonzero().view(-1)
            expected = expected - F.log_softmax(lg[i], 0)[pos].mean() / 12
    torch.testing.assert_close(contrastive_loss_reference(img, txt, s, ids=ids).loss, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["sample", "hardest"])
def test_negatives_never_hit_positives(backend, negatives):
    n = 36
    img, txt, s = _inputs(n, 12, torch.float32, scale=20.0)
    # Duplicate ids with near-identical features: the most similar texts are positives, which is
    # exactly where a naive miner picks a false negative.
    ids = torch.arange(n) // 3
    with torch.no_grad():
        txt[1::3] = txt[0::3] + 0.01 * torch.randn_like(txt[0::3])
    out = contrastive_loss(img, txt, s, ids=ids, negatives=negatives,
                           generator=torch.Generator().manual_seed(3), backend=backend)
    for neg in (out.neg_text_for_image, out.neg_image_for_text):
        assert neg.dtype == torch.int64 and neg.shape == (n,)
        assert ((neg >= 0) & (neg < n)).all()
        assert (ids[neg] != ids).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", ["sample", "hardest"])
def test_rows_without_candidates_return_minus_one(backend, negatives):
    img, txt, s = _inputs(20, 8, torch.float32)
    ids = torch.full((20,), 7)
    out = contrastive_loss(img, txt, s, ids=ids, negatives=negatives, backend=backend)
    assert (out.neg_text_for_image == -1).all() and (out.neg_image_for_text == -1).all()
    ref, _ = _reference_grads(img, txt, s, ids=ids)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss.double(), ref.loss, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_mining_returns_none(backend):
    img, txt, s = _inputs(10, 8, torch.float32)
    out = contrastive_loss(img, txt, s, negatives=None, backend=backend)
    assert out.neg_text_for_image is None and out.neg_image_for_text is None
    loss, neg_t, neg_i = out  # a named tuple
    assert loss is out.loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_reproducible_with_generator(backend):
    img, txt, s = _inputs(30, 8, torch.float32, scale=1.0)

    def draw(seed):
        out = contrastive_loss(img, txt, s, generator=torch.Generator().manual_seed(seed), backend=backend)
        return torch.cat([out.neg_text_for_image, out.neg_image_for_text])

    assert torch.equal(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6))


def _pearson(counts, probs, draws):
    expected = draws * probs
    valid = probs > 0
    stat = ((counts - expected)[valid] ** 2 / expected[valid]).sum().item()
    df = int(valid.sum().item()) - probs.shape[0]
    return stat, df


@pytest.mark.parametrize("sampler", ["reference", "torch", "triton"])
def test_sampled_negatives_follow_softmax_over_non_positives(sampler, monkeypatch):
    """Chi-square goodness of fit of the mined indices against softmax(sim) over the non-positives,
    pooled over every row and both directions, and never a positive.

    Triton: 64×16 tiles in 2 splits of 2 and 1 column tiles, so every part of the sampler is in
    the law tested: the inverse-CDF pick inside a tile, the reservoir's switch between tiles,
    the merge of the splits, a ragged last tile. (One row block: each interpreted launch is a
    few programs.)"""
    if sampler == "triton" and not triton_available():
        pytest.skip("needs triton")
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", (64, 16))
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", 2)
    n, d, scale, draws = 40, 16, 2.0, 300
    g = torch.Generator().manual_seed(11)
    img, txt = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    ids = torch.arange(n) // 2
    ids[-5:] = 100  # one 5-way positive group
    pos = ids[:, None] == ids[None, :]
    sim = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    probs = {"i2t": torch.softmax(sim.masked_fill(pos, -math.inf), 1).double(),
             "t2i": torch.softmax(sim.t().masked_fill(pos, -math.inf), 1).double()}
    counts = {k: torch.zeros(n, n, dtype=torch.float64) for k in probs}
    rows = torch.arange(n)
    gen = torch.Generator().manual_seed(2024)
    with torch.no_grad():
        for _ in range(draws):
            if sampler == "reference":
                out = contrastive_loss_reference(img, txt, scale, ids=ids, generator=gen)
            else:
                out = contrastive_loss(img, txt, scale, ids=ids, generator=gen, backend=sampler)
            for key, neg in (("i2t", out.neg_text_for_image), ("t2i", out.neg_image_for_text)):
                assert (ids[neg] != ids).all(), "a positive was mined"
                counts[key][rows, neg] += 1
    stat = df = 0
    uniform_stat = 0.0
    for key in probs:
        s_, d_ = _pearson(counts[key], probs[key], draws)
        stat, df = stat + s_, df + d_
        # Power check: the same counts are far from a plain uniform choice over the candidates.
        uniform = (~pos).double() / (~pos).sum(1, keepdim=True)
        uniform_stat += _pearson(counts[key], uniform, draws)[0]
    # Pearson's statistic has mean df and sd ≈ sqrt(2·df); 5 sd is a fixed-seed bound that a
    # correct sampler passes and a biased one (e.g. the uniform choice) fails by far.
    bound = df + 5 * math.sqrt(2 * df)
    assert stat < bound, (stat, df)
    assert uniform_stat > 2 * bound, (uniform_stat, df)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mining_ignores_label_smoothing_and_does_not_need_grad(backend):
    img, txt, s = _inputs(25, 8, torch.float32)
    a = contrastive_loss(img, txt, s, negatives="hardest", label_smoothing=0.3, backend=backend)
    b = contrastive_loss(img, txt, s, negatives="hardest", backend=backend)
    assert torch.equal(a.neg_text_for_image, b.neg_text_for_image)
    assert not a.neg_text_for_image.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_one_side_requires_grad(backend):
    img, txt, s = _inputs(18, 8, torch.float32)
    txt = txt.detach()
    s = s.detach()
    out = contrastive_loss(img, txt, s, backend=backend, negatives=None)
    (g,) = torch.autograd.grad(out.loss, (img,))
    ref, ref_grads = _reference_grads(img, txt, s)
    _assert_close(g, ref_grads[0], torch.float32, "grad image_feats")


def test_python_number_logit_scale_and_non_contiguous_inputs():
    img, txt, s = _inputs(20, 12, torch.float32)
    wide = torch.randn(12, 40)
    img_t = wide.t()[:20]  # non-contiguous [20, 12]
    for backend in ("torch", "triton"):
        out = contrastive_loss(img_t, txt, 3.0, negatives="hardest", backend=backend)
        ref = contrastive_loss_reference(img_t.contiguous(), txt, 3.0, negatives="hardest")
        torch.testing.assert_close(out.loss, ref.loss, atol=2e-5, rtol=1e-5)
        assert torch.equal(out.neg_text_for_image, ref.neg_text_for_image)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_launcher_default_tiles(dtype, monkeypatch):
    """The launcher's own tile and split choice (32×32 for 16-bit inputs, 16×16 for fp32),
    ragged edges."""
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", None)
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", None)
    img, txt, s = _inputs(70, 24, dtype, scale=8.0)
    ids = torch.arange(70) // 4
    out = contrastive_loss(img, txt, s, ids=ids, label_smoothing=0.05, negatives="hardest",
                           backend="triton")
    ref, ref_grads = _reference_grads(img, txt, s, ids=ids, label_smoothing=0.05)
    _assert_close(out.loss, ref.loss, dtype, "loss")
    for g, rg in zip(torch.autograd.grad(out.loss, (img, txt, s)), ref_grads):
        _assert_close(g, rg, dtype, "grad")
    if dtype == torch.float32:
        assert torch.equal(out.neg_text_for_image, ref.neg_text_for_image)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("negatives", ["sample", "hardest"])
def test_triton_split_sweeps_equal_one_sweep(negatives, monkeypatch):
    """Splitting the sweeps over more programs (what larger batches get on a GPU) changes
    nothing but the draw: the same loss and gradients up to summation order, the same "hardest"
    negatives, and sampled ones that stay valid (their law under splits is the chi-square test's
    tiled case: the splits' reservoirs merge by the same rule). 3 splits of 5 tiles: a narrower
    last split."""
    img, txt, s = _inputs(75, 20, torch.float64, scale=6.0)
    ids = torch.arange(75) // 3

    def run(splits):
        monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", splits)
        out = contrastive_loss(img, txt, s, ids=ids, label_smoothing=0.1, negatives=negatives,
                               generator=torch.Generator().manual_seed(3), backend="triton")
        return out, torch.autograd.grad(out.loss, (img, txt, s))

    (one, one_grads), (three, three_grads) = run(1), run(3)
    if negatives == "hardest":
        assert torch.equal(one.neg_text_for_image, three.neg_text_for_image)
        assert torch.equal(one.neg_image_for_text, three.neg_image_for_text)
    else:
        for neg in (one.neg_text_for_image, one.neg_image_for_text,
                    three.neg_text_for_image, three.neg_image_for_text):
            assert ((neg >= 0) & (neg < 75) & (ids[neg] != ids)).all()
        # the same tiling and seed draw the same negatives (counter-based uniforms)
        again, _ = run(3)
        assert torch.equal(again.neg_text_for_image, three.neg_text_for_image)
        assert torch.equal(again.neg_image_for_text, three.neg_image_for_text)
    torch.testing.assert_close(one.loss, three.loss, atol=1e-12, rtol=1e-12)
    for a, b in zip(one_grads, three_grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_loss_does_not_depend_on_tiles(monkeypatch):
    """Other tiles and splits (square or not: the GPU benchmark sweeps them) give the same loss and
    gradients; the sampled negatives are a function of (seed, tiling): one tiling and seed always
    draw the same ones (Philox counters name the row, the column tile or split, the stage and the
    direction of each uniform), and each is a valid non-positive."""
    img, txt, s = _inputs(45, 12, torch.float64, scale=2.0)

    def run(tiles, splits):
        monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", tiles)
        monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", splits)
        out = contrastive_loss(img, txt, s, generator=torch.Generator().manual_seed(9),
                               backend="triton")
        negatives = torch.cat([out.neg_text_for_image, out.neg_image_for_text])
        return negatives, out.loss, torch.autograd.grad(out.loss, (img, txt, s))

    first = run((16, 16), 2)
    assert torch.equal(first[0], run((16, 16), 2)[0])
    for tiles, splits in (((32, 32), 1), ((64, 32), 1), ((16, 64), 2)):
        other = run(tiles, splits)
        assert ((other[0] >= 0) & (other[0] < 45) & (other[0] != torch.arange(45).repeat(2))).all()
        torch.testing.assert_close(first[1], other[1], atol=1e-12, rtol=1e-12)
        for a, b in zip(first[2], other[2]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_split_choice(monkeypatch):
    if not triton_available():
        pytest.skip("needs triton")
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", None)
    splits = cl_launch._splits
    # B = 4096, 32-row tiles: 256 programs alone -> 4 splits of 32 column tiles
    assert splits(4096, 32, 4096, 32) == (4, 1024)
    # B = 65536 fills the GPU without splitting: no partial buffers
    assert splits(65536, 32, 65536, 32) == (1, 65536)
    # each split keeps at least 4 tiles; a ragged end gives a narrower last split
    assert splits(64, 32, 200, 32) == (1, 224)
    assert splits(512, 32, 520, 32)[0] == 4


def test_triton_rejects_too_wide_features():
    img, txt, s = _inputs(2, 1025, torch.float32)
    with pytest.raises(ValueError, match="feature dim"):
        contrastive_loss(img, txt, s, backend="triton")
    # "auto" on CPU is the PyTorch path, which has no width limit.
    assert torch.isfinite(contrastive_loss(img, txt, s, negatives=None).loss)


def test_module_temperature_is_learnable_and_clamped():
    torch.manual_seed(0)
    mod = ContrastiveLoss(negatives="hardest", backend="torch")
    assert math.isclose(mod.log_logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    img, txt, _ = _inputs(16, 8, torch.float32)
    out = mod(img, txt)
    expected = contrastive_loss(img, txt, mod.logit_scale, negatives="hardest", backend="torch")
    torch.testing.assert_close(out.loss, expected.loss)
    out.loss.backward()
    assert mod.log_logit_scale.grad is not None and mod.log_logit_scale.grad.abs() > 0
    with torch.no_grad():
        mod.log_logit_scale.fill_(10.0)
    assert math.isclose(mod.logit_scale.item(), 100.0, rel_tol=1e-5)
    mod.log_logit_scale.grad = None
    mod(img, txt).loss.backward()
    assert mod.log_logit_scale.grad.item() == 0.0  # clamped: no gradient past log(100)
    assert "label_smoothing" in repr(mod)


@pytest.mark.parametrize("negatives", [None, "hardest", "sample"])
def test_torch_compile_fullgraph(negatives):
    """The custom ops (fake kernels + autograd registration) trace without graph breaks."""
    img, txt, s = _inputs(12, 8, torch.float32)

    def fn(a, b, scale):
        out = contrastive_loss(a, b, scale, negatives=negatives, backend="torch")
        return out.loss, out.neg_text_for_image

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss, neg = compiled(img, txt, s)
    ref = contrastive_loss_reference(img, txt, s, negatives="hardest")
    torch.testing.assert_close(loss, ref.loss, atol=2e-5, rtol=1e-5)
    grads = torch.autograd.grad(loss, (img, txt, s))
    ref_grads = torch.autograd.grad(ref.loss, (img, txt, s))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=2e-5, rtol=1e-4)
    if negatives == "hardest":
        assert torch.equal(neg, ref.neg_text_for_image)
    elif negatives == "sample":
        assert ((neg >= 0) & (neg < 12) & (neg != torch.arange(12))).all()


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_torch_compile_fullgraph_triton_backend():
    img, txt, s = _inputs(20, 8, torch.float32)

    def fn(a, b, scale):
        return contrastive_loss(a, b, scale, negatives="hardest", backend="triton")

    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(img, txt, s)
    ref = contrastive_loss_reference(img, txt, s, negatives="hardest")
    torch.testing.assert_close(out.loss, ref.loss, atol=2e-5, rtol=1e-5)
    for g, rg in zip(torch.autograd.grad(out.loss, (img, txt, s)),
                     torch.autograd.grad(ref.loss, (img, txt, s))):
        torch.testing.assert_close(g, rg, atol=2e-5, rtol=1e-4)
    assert torch.equal(out.neg_image_for_text, ref.neg_image_for_text)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_ids,normalize", [(True, True), (False, True), (False, False)])
def test_opcheck_custom_ops(backend, with_ids, normalize):
    img, txt, s = _inputs(9, 6, torch.float32)
    ids = torch.arange(9) // 2 if with_ids else None
    if backend == "torch":
        uniforms, seeds = torch.rand(2, 9) + 2.0**-25, None
    else:
        uniforms, seeds = None, torch.tensor([12345])
    torch.library.opcheck(
        torch.ops.unigen.contrastive_loss_fwd.default,
        (img, txt, s, ids, seeds, uniforms, 0, 9, 0.1, 1, backend, normalize, True))
    with torch.no_grad():
        img, txt, s = img.detach(), txt.detach(), s.detach()
        _, _, lse, pos_cnt, inv = torch.ops.unigen.contrastive_loss_fwd(
            img, txt, s, ids, seeds, uniforms, 0, 9, 0.1, 1, backend, normalize, True)
    torch.library.opcheck(
        torch.ops.unigen.contrastive_loss_bwd.default,
        (torch.tensor(1.0), img, txt, s, ids, inv, lse, pos_cnt, 0, 0.1, backend, normalize))


@pytest.mark.skipif(not triton_available(), reason="needs triton")
@pytest.mark.parametrize("with_ids", [False, True])
def test_triton_step_launches(host_ops, with_ids):
    """A Triton step (forward with mining + backward) is 7 device launches: the seed's randint,
    five kernels (prep, sweep, its finish — which also reduces the input check —, the row
    backward, its finish — which also sums the logit_scale gradient) and the input check's
    assertion (on CPU its host read), besides autograd's seed gradient. It was 9 before the
    check's reduction and the scale gradient's sum moved into the finish kernels: at B = 4096
    the kernels take tens of microseconds, so every extra small op shows in the step time."""
    launched = []

    def launch(name, on_launch=None):
        def run(*args, **kwargs):
            launched.append(name)
            if on_launch is not None:
                on_launch(*args)
        return run

    kernels = {name: launch(name) for name in ("_prep_kernel", "_fwd_kernel", "_rows_bwd_kernel",
                                               "_cols_bwd_kernel", "_bwd_finish_kernel")}
    # its check flag (argument 9): inputs ok
    kernels["_fwd_finish_kernel"] = launch("_fwd_finish_kernel", lambda *args: args[9].fill_(1))
    img, txt, s = _inputs(40, 16, torch.float32)
    ids = torch.arange(40) // 2 if with_ids else None
    gen = torch.Generator().manual_seed(0)

    def step():
        launched.clear()
        out = contrastive_loss(img, txt, s, ids=ids, generator=gen, backend="triton")
        torch.autograd.grad(out.loss, (img, txt, s))

    ops = host_ops(cl_launch, kernels, step)
    assert launched == ["_prep_kernel", "_fwd_kernel", "_fwd_finish_kernel", "_rows_bwd_kernel",
                        "_bwd_finish_kernel"], launched
    stand_ins = {"aten::fill_", "aten::ones_like"}  # the flag stand-in above, autograd's seed
    own = sorted(op for op in ops if op not in stand_ins)
    # randint: the Philox seed; is_nonzero: the check's host read (torch._assert_async on CUDA)
    assert own == ["aten::is_nonzero", "aten::randint"], ops
    assert len(launched) + len(own) == 7


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_eager_function_equals_custom_op():
    """Eager mode runs the op through an autograd.Function (no custom-op dispatch); the custom
    op (what torch.compile traces) gives the same loss, negatives and gradients."""
    img, txt, s = _inputs(37, 12, torch.float64)
    ids = torch.arange(37) // 3
    args = (ids, torch.tensor([5]), None, 0, 37, 0.1, 1, "triton", True, True)
    eager = cl_op._ContrastiveLossFunction.apply(img, txt, s, *args)
    op = cl_op._contrastive_fwd_op(img, txt, s, *args)
    for a, b in zip(eager, op):
        assert torch.equal(a, b)
    for a, b in zip(torch.autograd.grad(eager[0], (img, txt, s)), torch.autograd.grad(op[0], (img, txt, s))):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ bad input


def _call(**overrides):
    img, txt, s = _inputs(8, 4, torch.float32)
    args = dict(image_feats=img, text_feats=txt, logit_scale=s)
    args.update(overrides)
    return contrastive_loss(args.pop("image_feats"), args.pop("text_feats"), args.pop("logit_scale"),
                            **args)


@pytest.mark.parametrize("overrides,exc,match", [
    (dict(text_feats=torch.randn(7, 4)), ValueError, "same batch size"),
    (dict(text_feats=torch.randn(8, 5)), ValueError, "same feature dim"),
    (dict(text_feats=torch.randn(8, 4, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(image_feats=torch.randn(8)), ValueError, "image_feats must have 2 dimensions"),
    (dict(image_feats=torch.randint(0, 3, (8, 4))), TypeError, "image_feats must have dtype"),
    (dict(image_feats=torch.randn(1, 4), text_feats=torch.randn(1, 4)), ValueError, "at least 2"),
    (dict(image_feats=torch.randn(0, 4), text_feats=torch.randn(0, 4)), ValueError, "empty"),
    (dict(logit_scale=-1.0), ValueError, "logit_scale must be positive"),
    (dict(logit_scale=torch.tensor(-2.0)), ValueError, "logit_scale must be positive"),
    (dict(logit_scale=torch.tensor(float("nan"))), ValueError, "logit_scale must be positive"),
    (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must hold one value"),
    (dict(logit_scale="3"), TypeError, "logit_scale"),
    (dict(ids=torch.arange(7)), ValueError, "ids must have one entry per pair"),
    (dict(ids=torch.arange(8).float()), TypeError, "ids must have dtype"),
    (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(negatives="random"), ValueError, "negatives must be"),
    (dict(generator=3), TypeError, "generator must be a torch.Generator"),
    (dict(backend="cpp"), RuntimeError, "no C\\+\\+ implementation"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(process_group=object()), RuntimeError, "process_group"),
    (dict(rank_sizes=[7]), ValueError, "rank_sizes\\[0\\] = 7 but this rank holds 8"),
    (dict(rank_sizes=[8, 3]), ValueError, "rank_sizes must have one entry per rank"),
    (dict(rank_sizes=[8.0]), ValueError, "rank_sizes must hold non-negative ints"),
    (dict(rank_sizes=8), TypeError, "rank_sizes must be a sequence"),
])
def test_bad_input_raises_clear_error(overrides, exc, match):
    with pytest.raises(exc, match=match):
        _call(**overrides)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["image_feats", "text_feats"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_raise(name, value, backend):
    # 37 rows: the bad one sits in the third 16-row block of the Triton check
    img, txt, s = _inputs(37, 4, torch.float32)
    bad = (img if name == "image_feats" else txt).detach().clone()
    bad[35, 1] = value
    args = {"image_feats": img, "text_feats": txt, name: bad}
    with pytest.raises(ValueError, match=f"{name} contains non-finite"):
        contrastive_loss(args["image_feats"], args["text_feats"], s, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_logit_scale_tensor_raises(scale, backend):
    img, txt, _ = _inputs(20, 4, torch.float32)
    with pytest.raises(ValueError, match="logit_scale must be positive and finite"):
        contrastive_loss(img, txt, torch.tensor(scale), backend=backend)


# ------------------------------------------------------------------ GPU (skipped without CUDA)


@pytest.mark.gpu
@pytest.mark.parametrize("negatives", [None, "sample", "hardest"])
def test_gpu_no_host_sync(negatives, no_host_sync, monkeypatch):
    """Loss, mining and gradients on CUDA never synchronise the host with the device."""
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", None)
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", None)
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(700, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    log_scale = torch.tensor(2.659, device="cuda", requires_grad=True)
    ids = torch.arange(700, device="cuda") // 2

    def step():
        out = contrastive_loss(img, txt, log_scale.exp(), ids=ids, negatives=negatives,
                               generator=g, label_smoothing=0.1)
        return torch.autograd.grad(out.loss, (img, txt, log_scale))

    step()
    with no_host_sync():
        grads = step()
    assert all(x.is_cuda for x in grads)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(1000, 256), (4097, 128)])
def test_gpu_triton_matches_reference(dtype, n, d, monkeypatch):
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", None)  # the launcher's GPU tiles
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", None)  # and splits
    g = torch.Generator(device="cuda").manual_seed(0)
    img = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    txt = torch.randn(n, d, device="cuda", generator=g).to(dtype).requires_grad_()
    s = torch.tensor(30.0, device="cuda", requires_grad=True)
    ids = torch.randint(0, n // 2, (n,), device="cuda", generator=g)
    out = contrastive_loss(img, txt, s, ids=ids, label_smoothing=0.1, generator=g, backend="triton")
    grads = torch.autograd.grad(out.loss, (img, txt, s))
    ref, ref_grads = _reference_grads(img, txt, s, ids=ids, label_smoothing=0.1)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.loss.double(), ref.loss, atol=tol, rtol=tol)
    for gr, rg in zip(grads, ref_grads):
        scale = rg.abs().max().item()
        assert (gr.double() - rg).abs().max().item() <= tol * scale + 1e-6
    for neg in (out.neg_text_for_image, out.neg_image_for_text):
        assert ((neg >= 0) & (ids[neg] != ids)).all()


@pytest.mark.gpu
def test_gpu_memory_is_linear_in_batch(monkeypatch):
    """B = 16384, D = 256: a B×B fp32 matrix alone would be 1 GiB; ours stays O(B·D)."""
    monkeypatch.setattr(cl_launch, "_BLOCK_OVERRIDE", None)
    monkeypatch.setattr(cl_launch, "_SPLIT_OVERRIDE", None)
    n, d = 16384, 256
    img = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(20.0, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = contrastive_loss(img, txt, s, backend="triton")
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * n * d, extra  # a few fp32 copies of [B, D], far below B·B·4 bytes


def test_rank_sizes_without_process_group_is_this_batch():
    """One process: ``rank_sizes=[B]`` is accepted (the batch is the global batch) and changes
    nothing; the distributed path is tested in test_contrastive_distributed.py."""
    img, txt, s = _inputs(8, 4, torch.float32)
    a = contrastive_loss(img, txt, s, negatives="hardest", backend="torch", rank_sizes=[8])
    b = contrastive_loss(img, txt, s, negatives="hardest", backend="torch")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.neg_text_for_image, b.neg_text_for_image)
