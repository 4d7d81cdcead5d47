"""The cost model of the fused cross-entropy's "mean"/"sum" path (``cost_model.py``) and the
launcher that follows it: at the GPT-2 head and a Llama-3 head (bf16) the chosen strategy moves
at most eager PyTorch's modelled HBM bytes in at most 1/8 of eager's working memory, and the
launcher runs exactly the plan (its blocks, its chunks, a padded row stride) — checked on
``meta`` tensors, with the kernels stubbed, at the real shapes."""

import importlib

import pytest
import torch

cost_model = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.cost_model")
launch = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")

HEADS = {"gpt2": ((20480, 768, 50257), "rows"), "llama3": ((8192, 4096, 128256), "vocab_chunks")}


@pytest.mark.parametrize("head", HEADS)
def test_the_plan_meets_the_bounds_at_the_heads(head):
    (n, d, v), strategy = HEADS[head]
    plan = cost_model.plan_reduced(n, d, v, 2)
    eager = cost_model.eager(n, d, v, 2)
    assert plan.strategy == strategy
    assert plan.bytes <= eager.bytes, (plan.bytes, eager.bytes)
    assert plan.working_bytes <= eager.working_bytes / 8
    # the same matmuls as eager where the logits are computed once, a third more otherwise
    assert plan.flops == pytest.approx(eager.flops * (1 if strategy == "rows" else 4 / 3))
    if strategy == "rows":  # faster than eager in the model, launch after launch
        assert plan.serial_s() < eager.serial_s() and plan.floor_s() < eager.floor_s()
    else:  # a third more FLOPs: the price of the memory bound, under which "rows" cannot run
        assert 2 * v * d > eager.working_bytes / 8  # dW's compensation alone would not fit


def test_eager_reference_numbers():
    """Eager's nine [N, V] passes and three live [N, V] tensors at the GPT-2 head."""
    n, d, v = HEADS["gpt2"][0]
    eager = cost_model.eager(n, d, v, 2)
    assert eager.working_bytes == 3 * n * v * 2
    assert eager.bytes == pytest.approx(9 * n * v * 2 + 3 * n * d * 2 + 3 * v * d * 2)
    assert eager.flops == 6 * n * d * v


def test_each_strategy_takes_the_largest_pieces_the_budget_allows():
    n, d, v = HEADS["gpt2"][0]
    budget = cost_model.eager(n, d, v, 2).working_bytes / 8
    rows = cost_model.plan_reduced(n, d, v, 2, strategy="rows")
    assert rows.rows == 5120 and rows.working_bytes <= budget  # 4 equal blocks
    bigger = cost_model.rows_strategy(n, d, v, 2, 2, 6832)  # 3 blocks: over the budget
    assert bigger.working_bytes > budget
    chunks = cost_model.plan_reduced(*HEADS["llama3"][0], 2)
    assert chunks.chunk == 32128 and -(-128256 // chunks.chunk) == 4


def test_group_rows_keep_a_groups_hidden_rows_in_l2():
    assert cost_model.group_rows(768, 2) == 64
    assert cost_model.group_rows(4096, 2) == 16
    assert 16 * 128 * 4096 * 2 <= cost_model.GROUP_L2_BYTES


class _Stub:
    """Stands in for a kernel launch and records its arguments."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


@pytest.mark.parametrize("head", HEADS)
def test_the_launcher_runs_the_plan(head, monkeypatch):
    """``triton_forward_reduced`` on meta tensors of the head's shape (no memory, no arithmetic;
    kernels stubbed): the rows strategy launches the row kernel on blocks of the planned rows in
    a buffer whose row stride is padded to 64 elements; vocab_chunks hands the planned chunk to
    the fused kernels."""
    (n, d, v), strategy = HEADS[head]
    rows_kernel, dw_kernel, chunks = _Stub(), _Stub(), _Stub()
    monkeypatch.setattr(launch, "_launch_rows_kernel", rows_kernel)
    monkeypatch.setattr(launch, "_launch_dw_kahan", dw_kernel)
    monkeypatch.setattr(launch, "_reduced_by_vocab_chunks",
                        lambda *a: chunks(*a) or (None,) * 6)
    meta = dict(device="meta")
    hidden = torch.empty(n, d, dtype=torch.bfloat16, **meta)
    weight = torch.empty(v, d, dtype=torch.bfloat16, **meta)
    target = torch.empty(n, dtype=torch.int64, **meta)
    scale = torch.empty(n, dtype=torch.float32, **meta)
    launch.triton_forward_reduced(hidden, weight, None, target, scale, -100, 0.0, 0.0, True, True,
                                  False, stats=False)
    plan = cost_model.plan_reduced(n, d, v, 2)
    if strategy == "rows":
        z_blocks = [args[0] for args, _ in rows_kernel.calls]
        assert [z.shape[0] for z in z_blocks] == [plan.rows] * (n // plan.rows)
        assert {z.stride(0) for z in z_blocks} == {cost_model.padded_width(v)} == {50304}
        assert len(dw_kernel.calls) == len(z_blocks) and not chunks.calls
    else:
        assert not rows_kernel.calls and chunks.calls[0][0][-1] == plan.chunk
