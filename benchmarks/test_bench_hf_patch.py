"""One training step (forward + backward) of a transformers Llama, unpatched vs patched for fused
cross-entropy: time and extra peak memory per provider.

Providers: ``torch`` (the model as transformers builds it: full logits, ForCausalLMLoss), ``ours``
(``unigen.kernels.patch_hf_model``), and, where they can patch this transformers (GPU only),
``liger`` (Liger-Kernel's instance patch) and ``cut_cross_entropy`` (CCE's ``cce_patch``, in
``cut_cross_entropy.transformers``, which PyPI's wheel does not ship: the row skips, saying so).

Two-rank rows (CPU, gloo; ``test_hf_llama_two_rank_step``): FSDP2 (each decoder layer and the
root sharded, each rank its own batch) and a vocabulary-parallel head (``ColwiseParallel`` over
the two ranks; unpatched, each rank gathers the whole logits for transformers' loss), unpatched
vs patched; the time is rank 0's step (rank 1 steps in lockstep, its own mean is recorded
beside), memory the peak of each rank (``peak_mem_mb`` the larger). The CPU model is the one
below; a GPU machine with one device skips them.

GPU: a 1B-class Llama (Llama 3.2 1B shapes: D = 2048, 16 layers, V = 128256) with random weights,
batch 1 × sequence 4096, bf16 autocast over fp32 weights. CPU: a small Llama (D = 256, 2 layers,
V = 32000), batch 2 × 512, fp32. ``peak_mem_mb`` is the peak above the model during the step, the
parameter gradients included (``outputs_mb``); the logits of the unpatched step are
``logits_mb``. Nothing downloads: the models are built from configs.
Run: ``pytest benchmarks/test_bench_hf_patch.py --benchmark-only``.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.conftest import NEEDS_CUDA, bench_device, device_name, optional, sync, tiny_shapes
from unigen.memory import PeakMemory

transformers = pytest.importorskip("transformers", reason="transformers not installed")

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
if ON_GPU:
    CONFIG = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
    BATCH, SEQ, AUTOCAST = 1, 4096, torch.bfloat16
elif tiny_shapes():  # gpu_check.sh --dry-run
    CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=1024, max_position_embeddings=64)
    BATCH, SEQ, AUTOCAST = 1, 64, None
else:
    CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512)
    BATCH, SEQ, AUTOCAST = 2, 512, None


def _patch_ours(model):
    from unigen.kernels import patch_hf_model

    return patch_hf_model(model)


def _patch_liger(model):
    optional("liger", "liger_kernel.transformers", "_apply_liger_kernel_to_instance")(model=model)
    return model


def _patch_cce(model):
    return optional("cut_cross_entropy", "cut_cross_entropy.transformers", "cce_patch")(model)


PROVIDERS = {"torch": lambda m: m, "ours": _patch_ours, "liger": _patch_liger, "cut_cross_entropy": _patch_cce}
GPU_ONLY = {"liger", "cut_cross_entropy"}


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**CONFIG, bos_token_id=1, eos_token_id=2)
    with torch.device(DEVICE):  # initialised in place: a 1B model builds in seconds on a GPU
        model = transformers.LlamaForCausalLM(cfg)
    return model.train()


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_hf_llama_train_step(benchmark, provider):
    if provider in GPU_ONLY and not ON_GPU:  # GPU kernels: on a CPU, installing them would not help
        pytest.skip(f"{provider}: {NEEDS_CUDA}")
    model = PROVIDERS[provider](_model())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, CONFIG["vocab_size"], (BATCH, SEQ), generator=g).to(DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=AUTOCAST, enabled=AUTOCAST is not None):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        sync(DEVICE)

    step()  # warm-up: kernel compilation, lazily built state
    model.zero_grad(set_to_none=True)
    with PeakMemory(DEVICE) as mem:
        step()
    outputs_mb = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None) / 2**20
    benchmark.group = "hf_llama_train_step"
    benchmark.extra_info.update(
        device=device_name(DEVICE), dtype=str(AUTOCAST or torch.float32).replace("torch.", ""),
        tokens=BATCH * SEQ, vocab=CONFIG["vocab_size"], peak_mem_mb=mem.extra_mb, outputs_mb=outputs_mb,
        logits_mb=BATCH * SEQ * CONFIG["vocab_size"] * 4 / 2**20)
    benchmark.pedantic(step, rounds=3 if ON_GPU else 2, warmup_rounds=0, iterations=1)


@pytest.mark.parametrize("setup", ["fsdp2", "vocab_parallel"])
@pytest.mark.parametrize("provider", ["torch", "ours"])
def test_hf_llama_two_rank_step(benchmark, setup, provider, tmp_path):
    import torch.distributed as dist

    from benchmarks import _hf_parallel

    if ON_GPU:
        pytest.skip("two ranks need two devices here: the rows are CPU (gloo) ones")
    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("needs gloo and no process group of this process's own")
    rounds = 2
    store, out = str(tmp_path / "store"), str(tmp_path / "rank1.json")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rank1 = subprocess.Popen([sys.executable, "-m", "benchmarks._hf_parallel", store, setup, provider,
                              str(rounds), out], cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per rank
    _hf_parallel.init(store, 0)
    try:
        _, step = _hf_parallel.build(setup, provider, 0)
        step()  # warm-up (rank 1 does one too)
        peak0 = _hf_parallel.peak_mb(step)
        benchmark.group = f"hf_llama_two_rank_{setup}"
        benchmark.pedantic(step, rounds=rounds, warmup_rounds=0, iterations=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        assert rank1.wait(timeout=600) == 0
    with open(out) as f:
        other = json.load(f)
    cfg = _hf_parallel.CONFIG
    benchmark.extra_info.update(
        device="CPU, 2 gloo ranks x 1 thread", dtype="float32", ranks=2,
        tokens_per_rank=_hf_parallel.BATCH * _hf_parallel.SEQ, vocab=cfg["vocab_size"],
        peak_mem_mb=max(peak0, other["peak_mem_mb"]), peak_mem_mb_rank0=peak0,
        peak_mem_mb_rank1=other["peak_mem_mb"], mean_ms_rank1=other["mean_ms"],
        logits_mb=_hf_parallel.BATCH * _hf_parallel.SEQ * cfg["vocab_size"] * 4 / 2**20)
