"""fused linear + vocabulary cross-entropy, fwd+bwd: time and extra peak memory per provider.

GPU grid: N ∈ {4096, 20480} target tokens, D = 768, V = 50257 (GPT-2 head; N = 20480 is the
headline case), and the Llama-3 head N = 8192, D = 4096, V = 128256, bf16; "ours" is the "mean"
path (its strategy chosen by the cost model of ``triton_forward_reduced``; ``ours_rows`` and
``ours_vocab_chunks`` force each of its two strategies, GPU only), "ours_reduction_none" the
fused kernels of ``reduction="none"``.
CPU grid: N ∈ {2048, 8192}, D = 256, V = 8192, fp32 (a few seconds per case on 2 cores), and
``test_cross_entropy_gpt2_head_cpu``: the GPT-2 head itself (N = 8192, D = 768, V = 50257, fp32),
one timed round per provider (~1 min each on 2 cores, 4.5 GB for eager PyTorch: marked ``long``,
run with ``--long``, as ``make bench`` does).
Memory: ``peak_mem_mb`` is the peak above the inputs during one fwd+bwd, the gradients of h and
W included; ``outputs_mb`` is the size of those gradients, which every provider must produce, so
the working memory a provider adds is the difference (the GPU target: at most 1/8 of eager
PyTorch's, whose logits, log-softmax and their gradient are three N × V tensors).
``test_ours_tile_sweep`` times the fused kernels of ``reduction="none"`` under every candidate tile
(``TILE_CANDIDATES``) at the headline N = 20480 (GPU only; its "ours" row is the pick of ``_triton_config``).
Run: ``pytest benchmarks/test_bench_cross_entropy.py --benchmark-only``.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import NEEDS_CUDA, bench_device, device_name, optional, sync, tiny_shapes
from unigen._extension import cpp_ops_available
from unigen.kernels import fused_linear_cross_entropy
from unigen.kernels.common.backend import triton_available
from unigen.memory import PeakMemory

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
if ON_GPU:
    GRID = [(4096, 768, 50257), (20480, 768, 50257), (8192, 4096, 128256)]
    HEADLINE = (20480, 768, 50257)
    DTYPE = torch.bfloat16
elif tiny_shapes():  # gpu_check.sh --dry-run
    GRID = [(96, 32, 512)]
    HEADLINE = GRID[0]
    DTYPE = torch.float32
else:
    GRID = [(2048, 256, 8192), (8192, 256, 8192)]
    HEADLINE = (8192, 256, 8192)
    DTYPE = torch.float32
SHAPES = [pytest.param(s, marks=[pytest.mark.headline] if s == HEADLINE else []) for s in GRID]

# Dense bf16 tensor-core peak (TFLOP/s) for the MFU column; None elsewhere.
DENSE_BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _naive(h, w, y):
    return F.cross_entropy(F.linear(h, w), y)


_compiled = None


def _compiled_naive(h, w, y):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(_naive, dynamic=False)
    return _compiled(h, w, y)


def _liger():
    return optional("liger", "liger_kernel.transformers.functional", "liger_fused_linear_cross_entropy")


def _cce():
    return optional("cut_cross_entropy", "cut_cross_entropy", "linear_cross_entropy")


PROVIDERS = {
    "torch": _naive,
    "torch.compile": _compiled_naive,
    "liger": _liger,  # resolved when its benchmark runs (a clean skip where it cannot)
    "cut_cross_entropy": _cce,
    "ours": lambda h, w, y: fused_linear_cross_entropy(h, w, y),
}
RESOLVED_AT_RUN = {"liger", "cut_cross_entropy"}
_FLCE = importlib.import_module("unigen.kernels.fused_linear_cross_entropy.launch")


def _ours_strategy(strategy):
    """The "mean" path in one strategy of its cost model (``cost_model.plan_reduced`` picks per
    shape; both are timed on a GPU so that a run can check the pick)."""
    def run(h, w, y):
        saved, _FLCE.REDUCED_STRATEGY = _FLCE.REDUCED_STRATEGY, strategy
        try:
            return fused_linear_cross_entropy(h, w, y)
        finally:
            _FLCE.REDUCED_STRATEGY = saved
    return run


if ON_GPU:
    PROVIDERS["ours_reduction_none"] = lambda h, w, y: fused_linear_cross_entropy(h, w, y, reduction="none").mean()
    PROVIDERS["ours_rows"] = _ours_strategy("rows")
    PROVIDERS["ours_vocab_chunks"] = _ours_strategy("vocab_chunks")
else:
    PROVIDERS["ours_torch_reference"] = lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="torch")
    if cpp_ops_available():
        PROVIDERS["ours_cpp"] = lambda h, w, y: fused_linear_cross_entropy(h, w, y, backend="cpp")



def _inputs(n, d, v):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(n, d, generator=g) * 1.0).to(DEVICE, DTYPE).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(DEVICE, DTYPE).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    return h, w, y


def _peak_tflops():
    if not ON_GPU:
        return None
    name = torch.cuda.get_device_name()
    return next((p for k, p in DENSE_BF16_PEAK.items() if k in name), None)


def _measure(benchmark, fn, shape, group="fused_linear_cross_entropy", rounds=5, warmup_rounds=1,
             **info):
    h, w, y = _inputs(*shape)

    def step():
        h.grad = w.grad = None
        fn(h, w, y).backward()
        sync(DEVICE)

    step()  # warm-up: compilation and autotuning stay out of the measurement
    with PeakMemory(DEVICE) as mem:
        step()
    outputs_mb = (h.grad.nbytes + w.grad.nbytes) / 2**20
    benchmark.group = group
    n, d, v = shape
    benchmark.extra_info.update(device=device_name(DEVICE), dtype=str(DTYPE).replace("torch.", ""),
                                peak_mem_mb=mem.extra_mb, outputs_mb=outputs_mb, **info)
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    seconds = benchmark.stats.stats.mean
    tflops = 6 * n * d * v / seconds / 1e12
    benchmark.extra_info["tflops"] = round(tflops, 2)
    peak = _peak_tflops()
    if peak:
        benchmark.extra_info["pct_dense_bf16_peak"] = round(100 * tflops / peak, 1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-V{s[2]}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_cross_entropy_fwd_bwd(benchmark, provider, shape):
    fn = PROVIDERS[provider]
    if provider in RESOLVED_AT_RUN:  # GPU kernels: on a CPU, installing them would not help
        if not ON_GPU:
            pytest.skip(f"{provider}: {NEEDS_CUDA}")
        fn = fn()
    if provider == "ours_rows":
        n, d, v = shape
        forced = _FLCE.reduced_plan(n, d, v, DTYPE, True, True, False, strategy="rows")
        budget = _FLCE.cost_model.eager(n, d, v, DTYPE.itemsize).working_bytes / 8
        if forced.working_bytes > budget:
            pytest.skip("the rows strategy does not fit 1/8 of eager's memory at this shape")
    _measure(benchmark, fn, shape)


GPT2_HEAD_CPU = (8192, 768, 50257)
HEAD_PROVIDERS = ["torch", "torch.compile", "ours", "ours_cpp"]


@pytest.mark.parametrize("provider", HEAD_PROVIDERS)
@pytest.mark.long("about 1 minute per provider, 4.5 GB for eager PyTorch")
def test_cross_entropy_gpt2_head_cpu(benchmark, provider):
    """The GPT-2 head on CPU (fp32, fwd+bwd): one warm-up (compilation), one step under the
    memory probe, one timed round; compare ``peak_mem_mb`` with the "torch" row's."""
    if ON_GPU or tiny_shapes():
        pytest.skip("the CPU case of the GPT-2 head (the GPU grid measures it on a GPU; not in a dry run)")
    if provider not in PROVIDERS:  # ours_cpp
        pytest.skip(f"{provider}: unigen._C is not built (pip install --no-build-isolation -e .)")
    _measure(benchmark, PROVIDERS[provider], GPT2_HEAD_CPU, group="fused_linear_cross_entropy_gpt2_head_cpu",
             rounds=1, warmup_rounds=0)


# Tiles of our Triton kernels to sweep on a GPU: "ours" is the launchers' pick for this dtype and
# D (``_triton_config``), then every candidate of ``TILE_CANDIDATES`` and the default tile in the
# previous launch order (GROUP_M >= the row blocks: every row block of a column first), which
# isolates what the grouped order buys. The winner becomes the pick in
# kernels/fused_linear_cross_entropy/launch.py::_select_config.
TILE_CONFIGS = {
    "ours": None,
    **{f"ours_{name}": cfg for name, cfg in _FLCE.TILE_CANDIDATES.items()},
    "ours_n128v128d32g4096w16s3": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=32, GROUP_M=4096,
                                       num_warps=16, num_stages=3),
}


@pytest.mark.parametrize("provider", TILE_CONFIGS)
def test_ours_tile_sweep(benchmark, provider):
    if not (ON_GPU and triton_available()):
        pytest.skip(f"tile sweep: {NEEDS_CUDA} and triton")
    flce = _FLCE
    cfg = TILE_CONFIGS[provider] or flce._triton_config(None, DTYPE, HEADLINE[1])

    def fn(h, w, y):
        # the fused kernels of reduction="none" (forward, then the recomputing backward of a mean)
        # with these tiles
        scale = torch.full((y.numel(),), 1.0 / y.numel(), device=DEVICE)
        rows, lse, _ = flce.triton_forward(h.detach(), w.detach(), None, y, -100, 0.0, 0.0,
                                           config=cfg)
        gh, gw, _ = flce.triton_backward(scale, h.detach(), w.detach(), None, y, lse, -100, 0.0,
                                         0.0, True, True, False, config=cfg)
        h.grad, w.grad = gh, gw
        return (rows * scale).sum().requires_grad_()  # backward of a leaf: nothing more to do

    _measure(benchmark, fn, HEADLINE, group="fused_linear_cross_entropy_tile_sweep", **cfg)
