"""The predicted H100 floors of docs/benchmarks.md (``benchmarks/roofline.py``): ours at or below
every alternative's floor at every headline shape, or the reason in its ``EXCEPTIONS`` (and no
reason left for a case that no longer needs one); ours taken from the cost model the
cross-entropy's launcher follows."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roofline(load_file_module):
    return load_file_module(ROOT / "benchmarks" / "roofline.py")


def test_ours_at_or_below_every_alternative_or_a_reason(roofline):
    found = roofline.violations()
    for title, provider, ours, theirs in found:
        assert roofline.exception_for(title, provider), (
            f"{title}: ours {ours:.3f} ms above {provider} {theirs:.3f} ms without a reason")
    used = {(head, p) for head, p in roofline.EXCEPTIONS
            if any(t.startswith(head) and provider == p for t, provider, _, _ in found)}
    assert used == set(roofline.EXCEPTIONS), set(roofline.EXCEPTIONS) - used


def test_tables_cover_every_headline_shape_and_provider(roofline):
    tables = roofline.headline_tables()
    assert len(tables) == 5
    providers = {r.provider for _, rows in tables for r in rows}
    for name in ("eager PyTorch", "torch.compile", "Liger-Kernel", "Cut Cross-Entropy",
                 "FlashAttention-2 varlen", "Inf-CL (no mining)", "FlexAttention"):
        assert name in providers, name
    text = roofline.markdown()
    assert text.count("(estimate)") == 5 and "Not measured" in text


def test_cross_entropy_rows_are_the_cost_model_of_the_launcher(roofline):
    cost_model = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.cost_model")
    for n, d, v in cost_model.HEADS.values():
        ours = next(r for r in roofline.cross_entropy_rows(n, d, v) if r.provider == "ours")
        plan = cost_model.plan_reduced(n, d, v, 2)
        assert (ours.flops, ours.bytes) == (plan.flops, plan.bytes)


