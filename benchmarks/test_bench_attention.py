"""Packed prefix-LM attention, forward + backward: ours vs the public alternatives.

The workload of the UniGen decoder: 512 samples of 75-115 tokens (prefix = 32 query tokens +
0-40 XLM-R embeddings + the task token), 12 heads, head_dim 64, bf16, packed into one
``[total_tokens, heads, head_dim]`` tensor. Two masks: ``causal`` (prefix_lens = 0, GPT-2 as
pre-trained) and ``prefix`` (bidirectional prefix, prefix-LM).

Providers (each skips cleanly when it cannot run here), ours first so that a run stopped at its
time limit still has our rows:

- ``ours``: ``prefix_lm_attention(backend="triton")`` on the packed tensors (at these lengths the
  per-(sample, head) kernels: one forward and one backward launch);
- ``sdpa_padded``: ``F.scaled_dot_product_attention`` on the batch padded to the longest sample
  with a dense boolean mask ``[B, 1, L, L]`` (padding and mask built outside the timed region:
  the padded model holds them already);
- ``flex``: FlexAttention (compiled) on the packed tensors, the prefix-LM block mask built
  inside the timed region as it must be for every new batch;
- ``flash_attn``: ``flash_attn_varlen_func`` called as a user calls it: causal, one call on
  ``cu_seqlens`` prepared outside the timed region (no sample ids, no host sync of ours); for the
  prefix-LM mask, the two-call decomposition (causal call + bidirectional call over the packed
  prefixes) with its gather index prepared outside the timed region as well;
- ``torch_varlen``: the same over PyTorch's own ``torch.nn.attention.varlen.varlen_attn``;
- ``xformers``: ``xformers.ops.memory_efficient_attention`` on the packed tokens with a
  ``BlockDiagonalCausalMask`` (built outside the timed region); xformers has no bias for a
  prefix per sample, so prefix-LM is the same two-call decomposition with a
  ``BlockDiagonalMask`` over the packed prefixes. Where xformers is installed but its kernels do
  not run (PyPI's wheel is built for CUDA 12, see ``benchmarks/fetch_gpu_wheels.sh``), a small
  probe call fails and the row skips with the error.

Targets on a GPU (same run, same device): prefix-LM >= 1.5x FlexAttention (its mask build
included) and >= 2x padded SDPA with its dense mask; causal within 1.1x of the fastest varlen
causal kernel. On CPU only a tiny case runs (seconds), to keep this file importable and
exercised; its timings mean nothing.

Each benchmark records the device, the versions and the extra peak memory of one fwd+bwd
(``peak_mem_mb``) in ``extra_info``; ``benchmarks/conftest.py`` writes the session's table with
the speed-up of ``ours`` over every provider of the same case. ``test_ours_tile_sweep`` times our
kernels under other tiles (GPU only): its "ours" row is the op's default (the per-sample
kernels' default tiles), the ``ours_sample_*`` rows other per-sample tiles and the
``ours_tiled_*`` rows the tiled kernels on the same batch; ``gpu_check.sh`` prints the best
configuration per case.
Run: ``pytest benchmarks/test_bench_attention.py --benchmark-only``.
"""

import pytest
import torch
import torch.nn.functional as F

from benchmarks.conftest import NEEDS_CUDA, bench_device, device_name, optional, sync, triton_unavailable
from unigen.kernels import prefix_lm_attention
from unigen.kernels.common.backend import triton_available
from unigen.kernels.prefix_lm_attention import (
    flash_attn_available,
    torch_varlen_available,
    triton_backward,
    triton_forward,
    triton_sample_backward,
    triton_sample_forward,
)
from unigen.memory import PeakMemory

DEVICE = bench_device()
CUDA = DEVICE.type == "cuda"

if CUDA:
    SHAPE = dict(samples=512, min_len=75, max_len=115, heads=12, head_dim=64, dtype=torch.bfloat16)
    ROUNDS, WARMUP = 20, 3
else:
    SHAPE = dict(samples=4, min_len=6, max_len=12, heads=2, head_dim=16, dtype=torch.float32)
    ROUNDS, WARMUP = 2, 1

PROVIDERS = ["ours", "sdpa_padded", "flex", "flash_attn", "torch_varlen", "xformers"]
MASKS = ["causal", "prefix"]


def _workload(mask):
    g = torch.Generator().manual_seed(0)
    n = SHAPE["samples"]
    lengths = torch.randint(SHAPE["min_len"], SHAPE["max_len"] + 1, (n,), generator=g)
    if mask == "causal":
        prefixes = torch.zeros_like(lengths)
    else:
        # 32 query tokens + up to 40 text embeddings + the task token, never the whole sample
        # (scaled down with the tiny CPU shape)
        base = min(33, SHAPE["min_len"] // 2)
        extra = torch.randint(0, max(1, min(41, SHAPE["min_len"] - base)), (n,), generator=g)
        prefixes = torch.minimum(base + extra, lengths - 1)
    cu = torch.zeros(n + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    T, H, D = int(cu[-1]), SHAPE["heads"], SHAPE["head_dim"]
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(DEVICE, SHAPE["dtype"]) for _ in range(4))
    return dict(q=q, k=k, v=v, do=do, cu=cu.to(DEVICE), plen=prefixes.to(DEVICE, torch.int32),
                lengths=lengths, max_seqlen=int(lengths.max()))


def _padded(w):
    """[B, H, L, D] copies of q, k, v, do and the dense boolean mask [B, 1, L, L]."""
    lengths, L = w["lengths"], w["max_seqlen"]
    B = lengths.numel()
    H, D = SHAPE["heads"], SHAPE["head_dim"]
    valid = torch.arange(L)[None, :] < lengths[:, None]
    out = []
    for name in ("q", "k", "v", "do"):
        x = torch.zeros(B, L, H, D, dtype=SHAPE["dtype"], device=DEVICE)
        x[valid.to(DEVICE)] = w[name]
        out.append(x.transpose(1, 2).contiguous())
    pos = torch.arange(L)
    plen = w["plen"].cpu().long()[:, None, None]
    qpos, kpos = pos[None, :, None], pos[None, None, :]
    allowed = ((kpos <= qpos) | ((kpos < plen) & (qpos < plen))) & valid[:, None, :]
    return (*out, allowed[:, None].to(DEVICE))


def _varlen_kernel(provider):
    """The public varlen kernel as (fn(q, k, v, cu, max_seqlen, causal) -> out), its
    signature resolved here, outside the timed region."""
    if provider == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        def fn(q, k, v, cu, max_seqlen, causal):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=causal)

        return fn
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    windowed = "window_size" in inspect.signature(varlen_attn).parameters

    def fn(q, k, v, cu, max_seqlen, causal):
        if windowed:  # newer torch: causal = window (-1, 0)
            return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen,
                               window_size=(-1, 0) if causal else (-1, -1))
        return varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, is_causal=causal)

    return fn


def _prefix_index(w):
    """The packed prefix tokens' positions and their cu_seqlens (the prefix-LM decomposition's
    second call), on the device; built outside the timed region."""
    lengths, plen = w["lengths"], w["plen"].cpu().long()
    starts = torch.cumsum(lengths, 0) - lengths
    idx = torch.cat([torch.arange(int(a), int(a) + int(p)) for a, p in zip(starts, plen)])
    cu_prefix = torch.zeros(plen.numel() + 1, dtype=torch.int32)
    cu_prefix[1:] = torch.cumsum(plen, 0)
    return idx.to(DEVICE), cu_prefix.to(DEVICE)


def _xformers_step(w, mask):
    """xformers' memory-efficient attention on the packed tokens ([1, T, H, D]) with a
    block-diagonal causal bias; prefix-LM as two calls (causal, then bidirectional over the
    packed prefixes). A small fwd + bwd probe first: a clean skip where the kernels do not run."""
    fmha = optional("xformers", "xformers.ops")
    bias = optional("xformers", "xformers.ops.fmha.attn_bias")
    try:
        probe = torch.randn(1, 32, 1, SHAPE["head_dim"], device=DEVICE, dtype=SHAPE["dtype"],
                            requires_grad=True)
        fmha.memory_efficient_attention(probe, probe, probe,
                                        attn_bias=bias.BlockDiagonalCausalMask.from_seqlens([20, 12])
                                        ).sum().backward()
    except Exception as err:  # no kernel for this GPU, CUDA runtime or torch
        pytest.skip(f"xformers is installed but its attention does not run here "
                    f"({type(err).__name__}: {str(err).splitlines()[0][:200]})")
    causal_bias = bias.BlockDiagonalCausalMask.from_seqlens(w["lengths"].tolist())
    q, k, v = (w[n].detach().unsqueeze(0).requires_grad_() for n in ("q", "k", "v"))
    do = w["do"].unsqueeze(0)
    if mask == "causal":
        def run():
            out = fmha.memory_efficient_attention(q, k, v, attn_bias=causal_bias)
            return torch.autograd.grad(out, (q, k, v), do)

        return run
    idx, _ = _prefix_index(w)
    prefix_bias = bias.BlockDiagonalMask.from_seqlens(w["plen"].tolist())

    def run():
        out = fmha.memory_efficient_attention(q, k, v, attn_bias=causal_bias)
        pre = fmha.memory_efficient_attention(q[:, idx], k[:, idx], v[:, idx], attn_bias=prefix_bias)
        out = out.index_copy(1, idx, pre)
        return torch.autograd.grad(out, (q, k, v), do)

    return run


def _varlen_step(provider, w, mask):
    """flash-attn / torch varlen as a user calls them: everything that depends only on the
    batch's metadata (int32 cu_seqlens, for prefix-LM the prefix tokens' gather index and their
    cu_seqlens) is prepared here, outside the timed region."""
    fn = _varlen_kernel(provider)
    cu = w["cu"].to(torch.int32)
    L = w["max_seqlen"]
    q, k, v = (w[n].detach().requires_grad_() for n in ("q", "k", "v"))
    if mask == "causal":
        def run():
            out = fn(q, k, v, cu, L, True)
            return torch.autograd.grad(out, (q, k, v), w["do"])

        return run
    idx, cu_prefix = _prefix_index(w)

    def run():
        # text rows from one causal call; prefix rows from a bidirectional call over the prefixes
        out = fn(q, k, v, cu, L, True)
        out = out.index_copy(0, idx, fn(q[idx], k[idx], v[idx], cu_prefix, L, False))
        return torch.autograd.grad(out, (q, k, v), w["do"])

    return run


def unavailable(provider: str) -> str | None:
    """Why ``provider`` cannot run here (the skip reason), or None."""
    if provider == "ours":
        return triton_unavailable()
    if provider == "flex" and not CUDA:
        return f"{NEEDS_CUDA} (FlexAttention has no CPU backward)"
    if provider == "flash_attn":
        return NEEDS_CUDA if not CUDA else None if flash_attn_available() else \
            "flash_attn not installed"
    if provider == "torch_varlen":
        return NEEDS_CUDA if not CUDA else None if torch_varlen_available() else \
            f"torch.nn.attention.varlen is not in torch {torch.__version__}"
    if provider == "xformers" and not CUDA:  # installed or not: its step says so on a GPU
        return NEEDS_CUDA
    return None


def _step(provider, w, mask):
    """A closure running one forward + backward of ``provider`` (one :func:`unavailable`
    accepts)."""
    if provider == "sdpa_padded":
        q, k, v, do, dense_mask = _padded(w)
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def run():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
            return torch.autograd.grad(out, (q, k, v), do)

        return run
    if provider in ("flash_attn", "torch_varlen"):
        return _varlen_step(provider, w, mask)
    if provider == "xformers":
        return _xformers_step(w, mask)
    backend = {"ours": "triton", "flex": "flex"}[provider]
    q, k, v = (w[n].detach().requires_grad_() for n in ("q", "k", "v"))

    def run():
        out = prefix_lm_attention(q, k, v, w["cu"], w["plen"], max_seqlen=w["max_seqlen"],
                                  backend=backend)
        return torch.autograd.grad(out, (q, k, v), w["do"])

    return run


def _synced(fn):
    def run():
        fn()
        sync(DEVICE)

    return run


def _measure(benchmark, run, **info):
    run()  # compile / cache the mask code outside the timed rounds
    with PeakMemory(DEVICE) as mem:
        run()
    benchmark.extra_info.update(
        device=device_name(DEVICE), torch=torch.__version__, triton=_triton_version(),
        samples=SHAPE["samples"], heads=SHAPE["heads"], head_dim=SHAPE["head_dim"],
        dtype=str(SHAPE["dtype"]).replace("torch.", ""), peak_mem_mb=mem.extra_mb, **info,
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_attention_fwd_bwd(benchmark, provider, mask):
    reason = unavailable(provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    w = _workload(mask)
    step = _step(provider, w, mask)
    _measure(benchmark, _synced(step), tokens=int(w["cu"][-1]))


# Tile configurations of our kernels to sweep on a GPU. "ours" is the op's default on this batch
# (the per-sample kernels, tiles of _per_sample_config: one 128-row slice, 8 warps, on wgmma in
# the sm_90 compile check); "ours_sample_*" try other query slices
# and warps of the per-sample kernels; "ours_tiled_*" time the tiled kernels on the same batch
# (the path samples over 128 tokens take). The winner replaces the default in
# kernels/prefix_lm_attention.py (_per_sample_config / _triton_config).
TILE_CONFIGS = {
    "ours": ("sample", None),
    "ours_sample_m16w4": ("sample", dict(BLOCK_M=16, num_warps=4)),
    "ours_sample_m32w4": ("sample", dict(BLOCK_M=32, num_warps=4)),
    "ours_sample_m64w8": ("sample", dict(BLOCK_M=64, num_warps=8)),
    "ours_sample_m32w8": ("sample", dict(BLOCK_M=32, num_warps=8)),  # the former default (mma.sync)
    "ours_tiled_m64n64": ("tiled", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    "ours_tiled_m32n64": ("tiled", dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)),
    "ours_tiled_m128n64": ("tiled", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
}


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("provider", TILE_CONFIGS)
def test_ours_tile_sweep(benchmark, provider, mask):
    if not (CUDA and triton_available()):
        pytest.skip(f"tile sweep: {NEEDS_CUDA} and triton")
    path, cfg = TILE_CONFIGS[provider]
    w = _workload(mask)
    scale = SHAPE["head_dim"] ** -0.5
    L = w["max_seqlen"]

    def step():
        if path == "sample":
            out, lse = triton_sample_forward(w["q"], w["k"], w["v"], w["cu"], w["plen"], scale, L,
                                             config=cfg)
            return triton_sample_backward(w["do"], w["q"], w["k"], w["v"], lse, w["cu"],
                                          w["plen"], scale, L, config=cfg)
        out, lse = triton_forward(w["q"], w["k"], w["v"], w["cu"], w["plen"], scale, config=cfg)
        return triton_backward(w["do"], w["q"], w["k"], w["v"], out, lse, w["cu"], w["plen"],
                               scale, config=cfg)

    _measure(benchmark, _synced(step), tokens=int(w["cu"][-1]), path=path, **(cfg or {}))


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None
