"""prefix_lm_attention: every backend against the dense-mask fp32 reference, values and gradients.

The Triton kernels run through Triton's interpreter on CPU (conftest sets TRITON_INTERPRET=1), so
the shapes here stay small: a few samples and 2 heads (one case of UniGen's 75-115-token samples
for the per-sample kernels). Both Triton paths are tested: the per-(sample, head) kernels (the
op's choice for max_seqlen <= 128 at fp16/bf16) and the tiled ones (longer samples and fp32,
forced here on short samples too). The GPU cases at the bottom take realistic shapes and skip
without CUDA.
"""

import math
import sys

import pytest
import torch

from unigen.kernels import prefix_lm_attention
from unigen.kernels.common.backend import triton_available
from unigen.kernels.prefix_lm_attention import (
    ATTENTION_BACKENDS,
    PrefixLMAttention,
    _resolve,
    flash_attn_available,
    key_ranges,
    prefix_lm_attention_reference,
    prefix_lm_dense_mask,
    sample_ids,
    torch_varlen_available,
    triton_backward,
    triton_forward,
    triton_sample_backward,
    triton_sample_forward,
    uses_per_sample_kernels,
)

# the op's files whose globals the tests reach: the launchers (kernels, tiles, the per-sample
# limit, the 64-bit offsets), the registration (custom op, eager Function), the portable backends
launch = sys.modules["unigen.kernels.prefix_lm_attention.launch"]
op = sys.modules["unigen.kernels.prefix_lm_attention.op"]
portable = sys.modules["unigen.kernels.prefix_lm_attention.portable_backends"]

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

# (lengths, prefix_lens): 1-token samples, prefix 0 (causal), prefix = whole sample, mixed.
CASES = {
    "mixed": ([7, 1, 12, 3, 9], [3, 0, 12, 1, 0]),
    "causal": ([5, 11, 1, 8], [0, 0, 0, 0]),
    "bidirectional": ([6, 1, 10], [6, 1, 10]),
    "one_sample": ([17], [5]),
    "empty_samples": ([0, 4, 0, 6], [0, 2, 0, 6]),
}


def _inputs(lengths, prefixes, heads=2, head_dim=16, dtype=torch.float32, device="cpu"):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    plen = torch.tensor(prefixes, dtype=torch.int32, device=device)
    T = sum(lengths)
    q, k, v = (torch.randn(T, heads, head_dim, device=device).to(dtype) for _ in range(3))
    return q, k, v, cu, plen


def _loop_reference(q, k, v, lengths, prefixes, scale):
    """Independent float64 ground truth: one sample at a time, mask written with Python loops."""
    outs, start = [], 0
    for n, p in zip(lengths, prefixes):
        mask = torch.zeros(n, n, dtype=torch.bool)
        for t in range(n):
            for s in range(n):
                mask[t, s] = s <= t or (s < p and t < p)
        qs, ks, vs = (x[start:start + n].double().transpose(0, 1) for x in (q, k, v))
        scores = (qs @ ks.transpose(1, 2) * scale).masked_fill(~mask, float("-inf"))
        outs.append((torch.softmax(scores, -1) @ vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _lowp_reference(q, k, v, cu, plen, scale):
    """The same math in the input precision (FlashAttention's "same-precision PyTorch")."""
    mask = prefix_lm_dense_mask(cu, plen, q.shape[0])
    scores = torch.einsum("thd,shd->hts", q, k * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), -1).to(q.dtype)
    return torch.einsum("hts,shd->thd", probs, v)


def _fwd_bwd(fn, q, k, v, do):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return out, dq, dk, dv


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# the mask and the reference


def test_dense_mask_matches_definition():
    lengths, prefixes = CASES["mixed"]
    _, _, _, cu, plen = _inputs(lengths, prefixes)
    T = sum(lengths)
    mask = prefix_lm_dense_mask(cu, plen, T)
    expected = torch.zeros(T, T, dtype=torch.bool)
    start = 0
    for n, p in zip(lengths, prefixes):
        for t in range(n):
            for s in range(n):
                expected[start + t, start + s] = s <= t or (s < p and t < p)
        start += n
    assert torch.equal(mask, expected)
    # the kernels' shortcut: each row's allowed keys are one contiguous range [lo, hi)
    lo, hi = key_ranges(cu, plen, T)
    cols = torch.arange(T)
    assert torch.equal((cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]), expected)


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_loop(case):
    lengths, prefixes = CASES[case]
    q, k, v, cu, plen = _inputs(lengths, prefixes, dtype=torch.float64)
    out = prefix_lm_attention_reference(q, k, v, cu, plen)
    expected = _loop_reference(q, k, v, lengths, prefixes, 1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(out, expected)


def test_prefix_changes_only_prefix_rows():
    """Bidirectional prefix vs causal: text rows are identical, prefix rows are not."""
    lengths = [9, 6]
    q, k, v, cu, _ = _inputs(lengths, [0, 0])
    causal = prefix_lm_attention(q, k, v, cu, torch.tensor([0, 0], dtype=torch.int32), max_seqlen=9)
    plm = prefix_lm_attention(q, k, v, cu, torch.tensor([4, 3], dtype=torch.int32), max_seqlen=9)
    text = torch.tensor([False] * 4 + [True] * 5 + [False] * 3 + [True] * 3)
    torch.testing.assert_close(causal[text], plm[text])
    # row 0 of each sample sees only itself causally, the whole prefix with prefix-LM
    assert not torch.allclose(causal[[0, 9]], plm[[0, 9]])


# ---------------------------------------------------------------------------------------------
# every backend against the reference


def _backends_here():
    out = ["torch", "sdpa"]
    if triton_available():
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _backends_here())
@pytest.mark.parametrize("case", sorted(CASES))
def test_backend_fp32_values_and_grads(backend, case):
    lengths, prefixes = CASES[case]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    do = torch.randn_like(q)
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a, b, c, cu, plen), q, k, v, do)
    got = _fwd_bwd(lambda a, b, c: prefix_lm_attention(a, b, c, cu, plen, max_seqlen=max(lengths),
                                                       backend=backend), q, k, v, do)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_forward_matches_reference():
    # PyTorch's FlexAttention has no CPU backward; its gradients are checked on GPU below.
    lengths, prefixes = CASES["mixed"]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    with torch.no_grad():
        out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=12, backend="flex")
    torch.testing.assert_close(out, prefix_lm_attention_reference(q, k, v, cu, plen),
                               atol=2e-5, rtol=1e-4)
    with pytest.raises(NotImplementedError, match="flex"):
        prefix_lm_attention(q.requires_grad_(), k, v, cu, plen, max_seqlen=12, backend="flex")


def test_softmax_scale_and_module():
    lengths, prefixes = CASES["mixed"]
    q, k, v, cu, plen = _inputs(lengths, prefixes, dtype=torch.float64)
    out = PrefixLMAttention(softmax_scale=0.3, backend="sdpa")(q, k, v, cu, plen, max_seqlen=12)
    torch.testing.assert_close(out, _loop_reference(q, k, v, lengths, prefixes, 0.3))


def test_auto_on_cpu_is_sdpa():
    q = torch.randn(4, 1, 16)
    assert _resolve("auto", q) == "sdpa"


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter


@needs_triton
@pytest.mark.parametrize("case,wide_index", [("mixed", False), ("bidirectional", False),
                                             ("mixed", True)])
def test_triton_small_tiles(case, wide_index, monkeypatch):
    """16-token tiles: query blocks straddle samples, rows span several key tiles, and the
    dK/dV programs loop over several query tiles; also with the 64-bit offsets that tensors
    of 2^31+ elements switch on."""
    monkeypatch.setattr(launch, "_wide_index", lambda *tensors: wide_index)
    lengths, prefixes = CASES[case]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    do = torch.randn_like(q)
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a, b, c, cu, plen), q, k, v, do)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16}
    scale = 1 / math.sqrt(q.shape[-1])
    out, lse = triton_forward(q, k, v, cu, plen, scale, config=cfg)
    grads = triton_backward(do, q, k, v, out, lse, cu, plen, scale, config=cfg)
    for name, g, r in zip(("out", "dq", "dk", "dv"), (out, *grads), ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # the saved LSE (log2 units) is the log-sum-exp of the masked scaled scores
    mask = prefix_lm_dense_mask(cu, plen, q.shape[0])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1) / math.log(2)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype,head_dim,config", [
    (torch.bfloat16, 64, None),
    (torch.bfloat16, 128, {"BLOCK_M": 16, "BLOCK_N": 32}),
    (torch.float16, 64, {"BLOCK_M": 32, "BLOCK_N": 16}),
])
def test_triton_low_precision_within_2x_of_pytorch(dtype, head_dim, config):
    """FlashAttention's accuracy rule: error vs the fp32 reference at most ~2x the error of the
    same computation done by PyTorch in the same precision."""
    lengths, prefixes = [9, 1, 14], [4, 1, 0]
    q, k, v, cu, plen = _inputs(lengths, prefixes, head_dim=head_dim, dtype=dtype)
    do = torch.randn_like(q)
    scale = 1 / math.sqrt(head_dim)
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a.float(), b.float(), c.float(),
                                                                  cu, plen), q, k, v, do.float())
    lowp = _fwd_bwd(lambda a, b, c: _lowp_reference(a, b, c, cu, plen, scale), q, k, v, do)

    def ours(a, b, c):
        out, lse = launch.triton_forward(a, b, c, cu, plen, scale, config=config)
        return _TritonFn.apply(a, b, c, out, lse, cu, plen, scale, config)

    got = _fwd_bwd(ours, q, k, v, do)
    for name, g, lp, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        assert g.dtype == dtype
        err, err_pt = _max_err(g, r), _max_err(lp, r)
        assert err <= 2 * err_pt + 1e-3, f"{name}: ours {err:.3g} vs same-precision PyTorch {err_pt:.3g}"


class _TritonFn(torch.autograd.Function):
    """Drives the launchers with a chosen tile config (the public op uses the default)."""

    @staticmethod
    def forward(ctx, q, k, v, out, lse, cu, plen, scale, config):
        ctx.save_for_backward(q, k, v, out, lse, cu, plen)
        ctx.scale, ctx.config = scale, config
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, cu, plen = ctx.saved_tensors
        dq, dk, dv = triton_backward(do, q, k, v, out, lse, cu, plen, ctx.scale, config=ctx.config)
        return dq, dk, dv, None, None, None, None, None, None


@needs_triton
def test_triton_public_op_bf16_default_tiles():
    lengths, prefixes = CASES["mixed"]
    q, k, v, cu, plen = _inputs(lengths, prefixes, dtype=torch.bfloat16)
    do = torch.randn_like(q)
    scale = 1 / math.sqrt(q.shape[-1])
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a.float(), b.float(), c.float(),
                                                                  cu, plen), q, k, v, do.float())
    lowp = _fwd_bwd(lambda a, b, c: _lowp_reference(a, b, c, cu, plen, scale), q, k, v, do)
    got = _fwd_bwd(lambda a, b, c: prefix_lm_attention(a, b, c, cu, plen, max_seqlen=12,
                                                       backend="triton"), q, k, v, do)
    for name, g, lp, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        err, err_pt = _max_err(g, r), _max_err(lp, r)
        assert err <= 2 * err_pt + 1e-3, f"{name}: ours {err:.3g} vs same-precision PyTorch {err_pt:.3g}"


@needs_triton
def test_triton_strided_qkv_and_int64_metadata():
    """q, k, v as views of one fused projection [T, 3, H, D]; int64 cu_seqlens / prefix_lens."""
    lengths, prefixes = [5, 8], [2, 8]
    T, H, D = 13, 2, 16
    qkv = torch.randn(T, 3, H, D)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    cu = torch.tensor([0, 5, 13])
    plen = torch.tensor(prefixes)
    out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=8, backend="triton")
    torch.testing.assert_close(out, _loop_reference(q, k, v, lengths, prefixes, D ** -0.5).float(),
                               atol=2e-5, rtol=1e-4)


def test_wide_index_follows_the_largest_offset():
    from unigen.kernels.common.checks import needs_wide_index

    meta = lambda size, stride: torch.empty_strided(size, stride, device="meta")
    assert not needs_wide_index(torch.empty(3, 2, 4), torch.empty(0, 2, 4))
    # q as a view of a [T, 3, H, D] projection: its offsets reach 3·T·H·D, not T·H·D
    T, H, D = 2**25, 16, 2
    assert T * H * D < 2**31 <= 3 * T * H * D
    assert needs_wide_index(meta((T, H, D), (3 * H * D, D, 1)))
    assert not needs_wide_index(meta((T, H, D), (H * D, D, 1)))


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "sdpa", "torch"])
def test_empty_batch(backend):
    q = torch.randn(0, 2, 16)
    cu = torch.zeros(2, dtype=torch.int32)
    plen = torch.zeros(1, dtype=torch.int32)
    out = prefix_lm_attention(q, q, q, cu, plen, max_seqlen=0, backend=backend)
    assert out.shape == (0, 2, 16)


@needs_triton
def test_triton_bad_metadata_without_validation_stays_in_bounds():
    """validate=False skips the host checks; the kernels clamp every index instead of reading
    out of bounds (wrong numbers for wrong metadata, but never a crash)."""
    q, k, v, _, _ = _inputs([6, 6], [0, 0])
    cu = torch.tensor([0, 40, 3], dtype=torch.int32)
    plen = torch.tensor([50, -7], dtype=torch.int32)
    out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=6, backend="triton", validate=False)
    assert out.shape == q.shape and torch.isfinite(out).all()


@needs_triton
def test_per_sample_rows_past_a_too_small_max_seqlen_are_nan():
    """validate=False and max_seqlen below the longest sample: the per-sample kernels (sized by
    max_seqlen) never see that sample's later tokens, and write NaN for them — in the output
    and in all three gradients — instead of leaving whatever the buffers held."""
    q, k, v, cu, plen = _inputs([20, 5], [3, 0], dtype=torch.bfloat16)
    assert uses_per_sample_kernels(8, q.shape[-1], q.dtype)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=8, backend="triton", validate=False)
    out.float().sum().backward()
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isnan(t[16:20].float()).all(), name  # BLOCK = 16 rows of sample 0
        assert torch.isfinite(t[:16].float()).all() and torch.isfinite(t[20:].float()).all(), name


@needs_triton
def test_triton_sample_ids_match_searchsorted():
    """The one-launch sample ids equal ``sample_ids`` (empty and 1-token samples included), and
    invalid cu_seqlens still give ids inside [0, B)."""
    g = torch.Generator().manual_seed(5)
    for lengths in ([1], [3, 0, 1, 7, 0, 0, 2], torch.randint(0, 40, (77,), generator=g).tolist()):
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        T = int(cu[-1])
        assert torch.equal(launch.triton_sample_ids(cu, T), sample_ids(cu, T))
    bad = torch.tensor([5, 40, 3, 2], dtype=torch.int32)
    ids = launch.triton_sample_ids(bad, 30)
    assert ids.shape == (30,) and int(ids.min()) >= 0 and int(ids.max()) <= 2


@needs_triton
def test_triton_step_adds_no_device_ops(host_ops):
    """A forward + backward through the Triton backend launches its five kernels (sample ids,
    forward, backward preprocess, dK/dV, dQ) and nothing else: at the decoder's sizes the
    kernels take a few hundred microseconds, so host-side PyTorch ops would show."""
    kernels = dict.fromkeys(("_sample_ids_kernel", "_fwd_kernel", "_bwd_preprocess_kernel",
                             "_bwd_dkdv_kernel", "_bwd_dq_kernel"))
    q, k, v, cu, plen = _inputs([5, 3, 9], [2, 0, 5])
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def step():
        out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=9, backend="triton",
                                  validate=False)
        torch.autograd.grad(out, (q, k, v), do)

    assert host_ops(launch, kernels, step) == []


@needs_triton
def test_per_sample_step_is_two_launches(host_ops):
    """The per-sample path (bf16, max_seqlen <= 128): one forward and one backward launch, no
    sample-id kernel and no other device op."""
    kernels = dict.fromkeys(("_sample_ids_kernel", "_fwd_kernel", "_bwd_preprocess_kernel",
                             "_bwd_dkdv_kernel", "_bwd_dq_kernel"))
    q, k, v, cu, plen = _inputs([5, 3, 9], [2, 0, 5], dtype=torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)
    launched = []
    for name in ("_sample_fwd_kernel", "_sample_bwd_kernel"):
        kernels[name] = lambda *args, _name=name, **kw: launched.append(_name)

    def step():
        out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=9, backend="triton",
                                  validate=False)
        torch.autograd.grad(out, (q, k, v), do)

    assert host_ops(launch, kernels, step) == []
    # two steps ran (warm-up + profiled): each launched exactly the two per-sample kernels
    assert launched == ["_sample_fwd_kernel", "_sample_bwd_kernel"] * 2


@needs_triton
@pytest.mark.parametrize("prefixes,dtype", [([2, 0, 5], torch.float32), ([0, 0, 0], torch.float32),
                                            ([2, 0, 5], torch.bfloat16)])
def test_eager_function_equals_custom_op(prefixes, dtype):
    """Eager mode runs through an autograd.Function (no custom-op dispatch); the custom op that
    torch.compile traces gives the same output and gradients, bit for bit."""
    q, k, v, cu, plen = _inputs([5, 3, 9], prefixes, dtype=dtype)
    do = torch.randn_like(q)
    results = []
    for fn in (op._PrefixLMAttentionFunction.apply, op._prefix_lm_attention_fwd_op):
        a, b, c = (x.detach().requires_grad_() for x in (q, k, v))
        out = fn(a, b, c, cu, plen, 9, 0.3)
        results.append((*out, *torch.autograd.grad(out[0], (a, b, c), do)))
    for x, y in zip(*results):
        assert torch.equal(x, y)


@needs_triton
def test_custom_op_opcheck_per_sample_path():
    """bf16 at max_seqlen <= 128 takes the per-sample kernels, which save no sample ids: the
    fake kernel must agree on that output's (empty) shape."""
    q, k, v, cu, plen = _inputs([4, 3], [2, 0], dtype=torch.bfloat16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    assert uses_per_sample_kernels(4, q.shape[-1], q.dtype)
    torch.library.opcheck(torch.ops.unigen.prefix_lm_attention_fwd.default,
                          (q, k, v, cu, plen, 4, 0.25),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))
    _, _, seq_id = torch.ops.unigen.prefix_lm_attention_fwd(q, k, v, cu, plen, 4, 0.25)
    assert seq_id.shape == (0,)


@needs_triton
def test_custom_op_opcheck_and_compile():
    """The torch.library registration: schema, fake kernel, autograd, and a fullgraph compile."""
    lengths, prefixes = [4, 3], [2, 0]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.unigen.prefix_lm_attention_fwd.default,
                          (q, k, v, cu, plen, 4, 0.25),
                          test_utils=("test_schema", "test_autograd_registration",
                                      "test_faketensor"))

    def f(q, k, v):
        return prefix_lm_attention(q, k, v, cu, plen, max_seqlen=4, backend="triton").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref_loss = prefix_lm_attention_reference(q, k, v, cu, plen).sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


def test_sdpa_path_compiles_fullgraph():
    """The CPU default (auto = sdpa) has no host sync, so a compiled model keeps one graph."""
    lengths, prefixes = [4, 3], [2, 0]
    q, k, v, cu, plen = _inputs(lengths, prefixes)

    def f(q, k, v):
        return prefix_lm_attention(q, k, v, cu, plen, max_seqlen=4)

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(out, prefix_lm_attention_reference(q, k, v, cu, plen),
                               atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# the per-(sample, head) kernels (max_seqlen <= 128)

# odd lengths: 1-token samples, prefix 0, prefix = whole sample, lengths not multiples of 16
SAMPLE_CASES = {
    "edges": ([7, 1, 12, 3, 9], [3, 0, 12, 1, 0]),
    "unigen": ([115, 75, 1, 96], [40, 0, 1, 96]),  # BLOCK 128, several 32-row slices
    "one_slice": ([17, 5], [17, 0]),  # BLOCK 32: 17 rows end inside the first 32-row slice
}


class _SampleFn(torch.autograd.Function):
    """The per-sample launchers as one autograd op (whatever dtype the op itself would route)."""

    @staticmethod
    def forward(ctx, q, k, v, cu, plen, scale, max_seqlen, config):
        out, lse = triton_sample_forward(q, k, v, cu, plen, scale, max_seqlen, config=config)
        ctx.save_for_backward(q, k, v, lse, cu, plen)
        ctx.args = scale, max_seqlen, config
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, lse, cu, plen = ctx.saved_tensors
        scale, max_seqlen, config = ctx.args
        grads = triton_sample_backward(do, q, k, v, lse, cu, plen, scale, max_seqlen, config=config)
        return (*grads, None, None, None, None, None)


def _check_against_reference(got_fn, q, k, v, cu, plen, scale):
    """fp32: close to the fp32 reference; fp16/bf16: FlashAttention's 2x rule."""
    do = torch.randn_like(q)
    got = _fwd_bwd(got_fn, q, k, v, do)
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a.float(), b.float(), c.float(),
                                                                  cu, plen, scale), q, k, v, do.float())
    if q.dtype == torch.float32:
        for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
            torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    lowp = _fwd_bwd(lambda a, b, c: _lowp_reference(a, b, c, cu, plen, scale), q, k, v, do)
    for name, g, lp, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        assert g.dtype == q.dtype
        err, err_pt = _max_err(g, r), _max_err(lp, r)
        assert err <= 2 * err_pt + 1e-3, f"{name}: ours {err:.3g} vs same-precision PyTorch {err_pt:.3g}"


@needs_triton
@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 64), (torch.bfloat16, 64),
                                            (torch.float16, 64), (torch.bfloat16, 24),
                                            (torch.float32, 24)])
def test_per_sample_kernels_match_reference(case, dtype, head_dim):
    lengths, prefixes = SAMPLE_CASES[case]
    q, k, v, cu, plen = _inputs(lengths, prefixes, head_dim=head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    _check_against_reference(lambda a, b, c: _SampleFn.apply(a, b, c, cu, plen, scale,
                                                             max(lengths), None),
                             q, k, v, cu, plen, scale)


@needs_triton
@pytest.mark.parametrize("config", [{"BLOCK_M": 16}, {"BLOCK_M": 64, "num_warps": 4},
                                    {"BLOCK": 64, "BLOCK_M": 64}])
def test_per_sample_other_tiles(config):
    """Other slices than the default (one slice per sample, several), and a BLOCK above the
    one max_seqlen asks for: the tile sweep's configurations give the same numbers."""
    lengths, prefixes = [13, 1, 20, 6], [5, 1, 0, 6]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    scale = 0.3
    _check_against_reference(lambda a, b, c: _SampleFn.apply(a, b, c, cu, plen, scale, 20, config),
                             q, k, v, cu, plen, scale)


@needs_triton
def test_per_sample_lse_and_empty_samples():
    """The saved LSE (log2 units) is the masked log-sum-exp; empty samples launch programs that
    touch nothing."""
    lengths, prefixes = [0, 4, 0, 11], [0, 2, 0, 11]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    scale = 0.25
    out, lse = triton_sample_forward(q, k, v, cu, plen, scale, 11)
    mask = prefix_lm_dense_mask(cu, plen, q.shape[0])
    scores = torch.einsum("thd,shd->hts", q, k) * scale
    expected = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1) / math.log(2)
    torch.testing.assert_close(lse, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, prefix_lm_attention_reference(q, k, v, cu, plen, scale),
                               atol=2e-5, rtol=1e-4)


def test_per_sample_block_and_routing():
    """BLOCK = next power of two >= max_seqlen, at least 16; the op routes fp16/bf16 with
    max_seqlen <= 128 and head_dim <= 64 to the per-sample kernels, the rest to the tiled."""
    if triton_available():
        for max_seqlen, block in ((1, 16), (16, 16), (17, 32), (115, 128), (128, 128)):
            assert launch._per_sample_config(max_seqlen, 64, torch.bfloat16)["BLOCK"] == block
        with pytest.raises(ValueError, match="BLOCK = 32 is smaller than max_seqlen = 40"):
            launch._per_sample_config(40, 64, torch.bfloat16, {"BLOCK": 32})
    bf16 = torch.bfloat16
    assert uses_per_sample_kernels(115, 64, bf16) and uses_per_sample_kernels(1, 24, torch.float16)
    assert not uses_per_sample_kernels(129, 64, bf16)
    assert not uses_per_sample_kernels(115, 128, bf16)
    assert not uses_per_sample_kernels(115, 64, torch.float32)
    assert not uses_per_sample_kernels(0, 64, bf16)


@needs_triton
@pytest.mark.parametrize("per_sample", [True, False])
def test_public_op_bf16_both_paths(per_sample, monkeypatch):
    """The public op at bf16 on short samples: the per-sample kernels by default, the tiled ones
    when the per-sample limit is lowered (the path longer samples take)."""
    if not per_sample:
        monkeypatch.setattr(launch, "PER_SAMPLE_MAX_SEQLEN", 0)
    lengths, prefixes = SAMPLE_CASES["edges"]
    q, k, v, cu, plen = _inputs(lengths, prefixes, dtype=torch.bfloat16)
    assert uses_per_sample_kernels(12, q.shape[-1], q.dtype) == per_sample
    _check_against_reference(lambda a, b, c: prefix_lm_attention(a, b, c, cu, plen, max_seqlen=12,
                                                                 backend="triton"),
                             q, k, v, cu, plen, q.shape[-1] ** -0.5)


@needs_triton
def test_per_sample_wide_index_and_strided_views(monkeypatch):
    """64-bit offsets, q/k/v as views of one [T, 3, H, D] projection."""
    monkeypatch.setattr(launch, "_wide_index", lambda *tensors: True)
    prefixes = [2, 8]  # samples of 5 and 8 tokens
    qkv = torch.randn(13, 3, 2, 16).to(torch.bfloat16)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0, 5, 13])
    _check_against_reference(lambda a, b, c: prefix_lm_attention(a, b, c, cu, torch.tensor(prefixes),
                                                                 max_seqlen=8, backend="triton"),
                             q, k, v, cu, torch.tensor(prefixes), 0.25)


@needs_triton
def test_per_sample_bad_metadata_stays_in_bounds():
    q, k, v, _, _ = _inputs([6, 6], [0, 0], dtype=torch.bfloat16)
    cu = torch.tensor([0, 40, 3], dtype=torch.int32)
    plen = torch.tensor([50, -7], dtype=torch.int32)
    out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=12, backend="triton", validate=False)
    assert out.shape == q.shape and torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# flash-attn: the two-call decomposition, driven by a PyTorch stand-in for the varlen kernel


def _varlen_stand_in(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract in PyTorch (equal q/k lengths, as our calls use)."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k)
    assert int((cu_q[1:] - cu_q[:-1]).max()) <= max_q
    out = torch.zeros_like(q)
    pieces = []
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        n = b - a
        scores = torch.einsum("thd,shd->hts", q[a:b], k[a:b]) * softmax_scale
        if causal:
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        pieces.append(torch.einsum("hts,shd->thd", torch.softmax(scores, -1), v[a:b]))
    total = int(cu_q[-1])
    if pieces:
        out = torch.cat([torch.cat(pieces), out[total:]])
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_flash_attn_decomposition(case):
    lengths, prefixes = CASES[case]
    q, k, v, cu, plen = _inputs(lengths, prefixes)
    do = torch.randn_like(q)
    scale = 1 / math.sqrt(q.shape[-1])
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a, b, c, cu, plen), q, k, v, do)
    got = _fwd_bwd(lambda a, b, c: portable._flash_attn_forward(a, b, c, cu, plen, max(lengths),
                                                                scale, varlen_fn=_varlen_stand_in),
                   q, k, v, do)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_missing_is_a_clear_error():
    q = torch.randn(4, 1, 16)
    cu, plen = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="flash-attn"):
        prefix_lm_attention(q, q, q, cu, plen, max_seqlen=4, backend="flash_attn")


# ---------------------------------------------------------------------------------------------
# bad input


def _good():
    q, k, v, cu, plen = _inputs([3, 5], [1, 5])
    return dict(q=q, k=k, v=v, cu_seqlens=cu, prefix_lens=plen, max_seqlen=5)


def _with(**changes):
    args = _good()
    args.update(changes)
    return args


BAD = [
    (lambda: _with(q=torch.randn(8, 2)), ValueError, "q must have 3 dimensions"),
    (lambda: _with(k=torch.randn(8, 2, 8)), ValueError, "k must have the shape of q"),
    (lambda: _with(v=torch.randn(8, 2, 16, dtype=torch.float64)), TypeError, "v must have the dtype"),
    (lambda: _with(q=torch.randint(0, 3, (8, 2, 16))), TypeError, "q must have dtype"),
    (lambda: _with(cu_seqlens=torch.tensor([0.0, 3.0, 8.0])), TypeError, "cu_seqlens must have dtype"),
    (lambda: _with(cu_seqlens=torch.tensor([1, 3, 8], dtype=torch.int32)), ValueError,
     r"cu_seqlens\[0\] must be 0"),
    (lambda: _with(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32)), ValueError,
     r"cu_seqlens\[-1\] must equal total_tokens = 8"),
    (lambda: _with(cu_seqlens=torch.tensor([0, 6, 4, 8], dtype=torch.int32),
                   prefix_lens=torch.tensor([0, 0, 0], dtype=torch.int32)), ValueError,
     "cu_seqlens must be non-decreasing"),
    (lambda: _with(prefix_lens=torch.tensor([4, 1], dtype=torch.int32)), ValueError,
     r"prefix_lens\[0\] = 4 must lie in \[0, length of sample 0 = 3\]"),
    (lambda: _with(prefix_lens=torch.tensor([1, -1], dtype=torch.int32)), ValueError,
     r"prefix_lens\[1\] = -1"),
    (lambda: _with(prefix_lens=torch.tensor([1], dtype=torch.int32)), ValueError, "disagree"),
    (lambda: _with(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")), ValueError,
     "cu_seqlens is on meta but the other inputs are on cpu"),
    (lambda: _with(max_seqlen=4), ValueError, "max_seqlen = 4 is smaller than the length of sample 1"),
    (lambda: _with(max_seqlen=5.0), TypeError, "max_seqlen must be a non-negative Python int"),
    (lambda: _with(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive"),
]


@pytest.mark.parametrize("make,exc,match", BAD)
def test_bad_input(make, exc, match):
    args = make()
    with pytest.raises(exc, match=match):
        prefix_lm_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"),
                            args.pop("prefix_lens"), **args)


def test_bad_backend():
    args = _good()
    q, k, v, cu, plen = (args.pop(n) for n in ("q", "k", "v", "cu_seqlens", "prefix_lens"))
    with pytest.raises(ValueError, match="backend must be one of"):
        prefix_lm_attention(q, k, v, cu, plen, backend="xformers", **args)
    with pytest.raises(RuntimeError, match="no C\\+\\+ implementation"):
        prefix_lm_attention(q, k, v, cu, plen, backend="cpp", **args)
    if triton_available():
        with pytest.raises(TypeError, match="backend='triton' takes float16, bfloat16 or float32"):
            prefix_lm_attention(q.double(), k.double(), v.double(), cu, plen, backend="triton", **args)
    with pytest.raises((RuntimeError, ValueError), match="torch_varlen"):
        prefix_lm_attention(q, k, v, cu, plen, backend="torch_varlen", **args)  # CPU fp32
    assert set(ATTENTION_BACKENDS) >= {"auto", "triton", "torch", "sdpa", "flex", "flash_attn", "cpp"}


def test_triton_on_cpu_without_interpreter(monkeypatch):
    if not triton_available():
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args = _good()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        prefix_lm_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"),
                            args.pop("prefix_lens"), backend="triton", **args)


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): realistic shapes, every backend available there


def _gpu_batch(n_samples, head_dim, dtype, prefix_mode, heads=4):
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(75, 116, (n_samples,), generator=g)
    lengths[0], lengths[1] = 1, 2  # the edge cases ride along
    if prefix_mode == "causal":
        prefixes = torch.zeros_like(lengths)
    else:
        prefixes = torch.minimum(torch.randint(0, 74, (n_samples,), generator=g), lengths)
        prefixes[2] = lengths[2]  # a fully bidirectional sample
    q, k, v, cu, plen = _inputs(lengths.tolist(), prefixes.tolist(), heads=heads, head_dim=head_dim,
                                dtype=dtype, device="cuda")
    return q, k, v, cu, plen, int(lengths.max())


def _gpu_backends():
    out = ["triton", "sdpa", "flex"]
    if flash_attn_available():
        out.append("flash_attn")
    if torch_varlen_available():
        out.append("torch_varlen")
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("backend,head_dim", [
    (b, d) for b in _gpu_backends() for d in (64, 128)
    if not (b == "flex" and d == 128)  # each FlexAttention compile costs ~half a minute
])
@pytest.mark.parametrize("prefix_mode", ["causal", "prefix"])
def test_gpu_backend_bf16_within_2x_of_pytorch(backend, head_dim, prefix_mode):
    q, k, v, cu, plen, max_len = _gpu_batch(24, head_dim, torch.bfloat16, prefix_mode)
    do = torch.randn_like(q)
    scale = 1 / math.sqrt(head_dim)
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a.float(), b.float(), c.float(),
                                                                  cu, plen), q, k, v, do.float())
    lowp = _fwd_bwd(lambda a, b, c: _lowp_reference(a, b, c, cu, plen, scale), q, k, v, do)
    got = _fwd_bwd(lambda a, b, c: prefix_lm_attention(a, b, c, cu, plen, max_seqlen=max_len,
                                                       backend=backend), q, k, v, do)
    # our kernels meet FlashAttention's 2x rule; the public kernels only go through our glue
    factor = 2 if backend == "triton" else 3
    for name, g, lp, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        err, err_pt = _max_err(g, r), _max_err(lp, r)
        assert err <= factor * err_pt + 1e-4, f"{name}: {backend} {err:.3g} vs PyTorch bf16 {err_pt:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", ["long", "short_forced_tiled"])
def test_gpu_tiled_path_bf16(lengths, monkeypatch):
    """The tiled kernels on the GPU: samples over 128 tokens (the op's own choice), and UniGen's
    short samples with the per-sample path switched off."""
    if lengths == "long":
        g = torch.Generator().manual_seed(2)
        lens = torch.randint(129, 300, (6,), generator=g).tolist()
        prefixes = [40, 0, lens[2], 7, 0, 129]
        q, k, v, cu, plen = _inputs(lens, prefixes, heads=4, head_dim=64, dtype=torch.bfloat16,
                                    device="cuda")
        max_len = max(lens)
    else:
        monkeypatch.setattr(launch, "PER_SAMPLE_MAX_SEQLEN", 0)
        q, k, v, cu, plen, max_len = _gpu_batch(24, 64, torch.bfloat16, "prefix")
    assert not uses_per_sample_kernels(max_len, 64, torch.bfloat16)
    do = torch.randn_like(q)
    scale = 1 / 8
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a.float(), b.float(), c.float(),
                                                                  cu, plen), q, k, v, do.float())
    lowp = _fwd_bwd(lambda a, b, c: _lowp_reference(a, b, c, cu, plen, scale), q, k, v, do)
    got = _fwd_bwd(lambda a, b, c: prefix_lm_attention(a, b, c, cu, plen, max_seqlen=max_len),
                   q, k, v, do)
    for name, g_, lp, r in zip(("out", "dq", "dk", "dv"), got, lowp, ref):
        err, err_pt = _max_err(g_, r), _max_err(lp, r)
        assert err <= 2 * err_pt + 1e-4, f"{name}: tiled {err:.3g} vs PyTorch bf16 {err_pt:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_triton_other_dtypes(dtype):
    q, k, v, cu, plen, max_len = _gpu_batch(16, 64, dtype, "prefix")
    do = torch.randn_like(q)
    ref = _fwd_bwd(lambda a, b, c: prefix_lm_attention_reference(a.double(), b.double(), c.double(),
                                                                  cu, plen), q, k, v, do.double())
    got = _fwd_bwd(lambda a, b, c: prefix_lm_attention(a, b, c, cu, plen, max_seqlen=max_len,
                                                       backend="triton"), q, k, v, do)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}[dtype]
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        assert _max_err(g, r) <= tol * max(1.0, r.abs().max().item()), name


@pytest.mark.gpu
@pytest.mark.parametrize("prefix_mode", ["causal", "prefix"])
def test_gpu_no_host_sync(prefix_mode, no_host_sync):
    """The Triton path (the CUDA default) never synchronises the host with the device."""
    q, k, v, cu, plen, max_len = _gpu_batch(16, 64, torch.bfloat16, prefix_mode)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    do = torch.randn_like(q)

    def step():
        out = prefix_lm_attention(q, k, v, cu, plen, max_seqlen=max_len)
        return torch.autograd.grad(out, (q, k, v), do)

    step()
    with no_host_sync():
        grads = step()
    assert all(g.is_cuda for g in grads)


@pytest.mark.gpu
def test_gpu_triton_compiles_without_graph_breaks():
    q, k, v, cu, plen, max_len = _gpu_batch(8, 64, torch.bfloat16, "prefix")
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def f(q, k, v):
        return prefix_lm_attention(q, k, v, cu, plen, max_seqlen=max_len).float().square().sum()

    loss = torch.compile(f, fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = f(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2)
