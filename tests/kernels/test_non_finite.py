"""One policy for non-finite inputs across the three ops (docs/architecture.md, "Non-finite
inputs"), tested the same way for each: with ``validate`` at its default a nan or inf that reaches
the result raises on CPU naming the argument; ``validate=False`` lets it through to a non-finite
result and nothing else (no crash, the mined indices in range); inside torch.compile the check
is a device assertion."""

import pytest
import torch

from unigen._extension import cpp_ops_available
from unigen.kernels import contrastive_loss, fused_linear_cross_entropy, prefix_lm_attention
from unigen.kernels.common.backend import triton_available, triton_interpreting

TRITON = ["triton"] if triton_available() and triton_interpreting() else []
CE_BACKENDS = ["torch"] + (["cpp"] if cpp_ops_available() else []) + TRITON
CL_BACKENDS = ["torch"] + TRITON
ATTN_BACKENDS = ["torch", "sdpa"] + TRITON
BAD = {"nan": float("nan"), "inf": float("inf")}


def cross_entropy_case(backend, validate=None, bad=None):
    g = torch.Generator().manual_seed(0)
    args = {"hidden": torch.randn(9, 16, generator=g), "weight": torch.randn(37, 16, generator=g) / 4,
            "bias": torch.randn(37, generator=g) / 10}
    target = torch.randint(0, 37, (9,), generator=g)
    target[4] = -100
    if bad is not None:
        name, value = bad
        args[name][3 if name == "hidden" else 5] = value  # row 3 is kept (row 4 is ignored)
    loss = fused_linear_cross_entropy(args["hidden"], args["weight"], target, args["bias"],
                                      backend=backend, validate=validate)
    return loss, {}


def contrastive_case(backend, validate=None, bad=None):
    g = torch.Generator().manual_seed(0)
    args = {"image_feats": torch.randn(12, 16, generator=g), "text_feats": torch.randn(12, 16, generator=g)}
    if bad is not None:
        name, value = bad
        args[name][5, 7] = value
    out = contrastive_loss(args["image_feats"], args["text_feats"], 10.0, backend=backend, validate=validate,
                           generator=torch.Generator().manual_seed(1))
    return out.loss, {"negatives": (out.neg_text_for_image, out.neg_image_for_text), "n": 12}


def attention_case(backend, validate=None, bad=None):
    g = torch.Generator().manual_seed(0)
    args = {name: torch.randn(13, 2, 16, generator=g) for name in ("q", "k", "v")}
    cu_seqlens, prefix_lens = torch.tensor([0, 6, 13]), torch.tensor([2, 0])
    if bad is not None:
        name, value = bad
        args[name][8, 1, 3] = value
    out = prefix_lm_attention(args["q"], args["k"], args["v"], cu_seqlens, prefix_lens, max_seqlen=7,
                              backend=backend, validate=validate)
    return out, {}


CASES = ([(cross_entropy_case, b, arg) for b in CE_BACKENDS for arg in ("hidden", "weight", "bias")]
         + [(contrastive_case, b, arg) for b in CL_BACKENDS for arg in ("image_feats", "text_feats")]
         + [(attention_case, b, arg) for b in ATTN_BACKENDS for arg in ("q", "k", "v")])
IDS = [f"{case.__name__.removesuffix('_case')}-{backend}-{arg}" for case, backend, arg in CASES]


@pytest.mark.parametrize("case,backend,arg", CASES, ids=IDS)
def test_finite_inputs_pass_the_check(case, backend, arg):
    result, _ = case(backend, validate=True)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("case,backend,arg", CASES, ids=IDS)
def test_a_non_finite_input_raises_naming_it(case, backend, arg, value):
    with pytest.raises(ValueError, match=f"{arg} contains non-finite values"):
        case(backend, bad=(arg, BAD[value]))


@pytest.mark.parametrize("value", ["nan", "inf"])
@pytest.mark.parametrize("case,backend,arg", CASES, ids=IDS)
def test_validate_false_gives_a_non_finite_result_and_nothing_worse(case, backend, arg, value):
    result, extra = case(backend, validate=False, bad=(arg, BAD[value]))
    assert not torch.isfinite(result).all()
    for negatives in extra.get("negatives", ()):
        assert bool(((negatives >= -1) & (negatives < extra["n"])).all()), negatives


def test_ignored_rows_never_reach_the_loss_and_are_not_checked():
    hidden, weight = torch.randn(5, 8), torch.randn(11, 8)
    target = torch.tensor([1, 2, -100, 3, 4])
    hidden[2] = float("nan")
    assert torch.isfinite(fused_linear_cross_entropy(hidden, weight, target))


def test_the_check_inside_torch_compile_is_a_device_assertion():
    # no host read in the traced graph: torch._assert_async, which raises on CPU when it runs
    weight = torch.randn(23, 8)
    target = torch.randint(0, 23, (6,))

    def loss(hidden):
        return fused_linear_cross_entropy(hidden, weight, target, backend="torch", validate=True)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()
    try:
        assert torch.isfinite(compiled(torch.randn(6, 8)))
        bad = torch.randn(6, 8)
        bad[1, 2] = float("nan")
        with pytest.raises(RuntimeError, match="non-finite"):
            compiled(bad)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("op", ["fused_linear_cross_entropy", "contrastive_loss", "prefix_lm_attention"])
def test_validate_takes_none_true_or_false(op):
    call = {"fused_linear_cross_entropy": lambda v: cross_entropy_case("torch", validate=v),
            "contrastive_loss": lambda v: contrastive_case("torch", validate=v),
            "prefix_lm_attention": lambda v: attention_case("torch", validate=v)}[op]
    with pytest.raises(TypeError, match=f"{op}: validate must be None, True or False"):
        call("yes")


def test_an_empty_attention_batch_says_so():
    q = torch.randn(0, 2, 8)
    with pytest.raises(ValueError, match="the batch is empty: cu_seqlens must hold B \\+ 1 >= 2"):
        prefix_lm_attention(q, q, q, torch.tensor([0]), torch.tensor([], dtype=torch.long), max_seqlen=0)
