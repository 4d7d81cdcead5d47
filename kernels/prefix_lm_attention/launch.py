"""Launchers of the prefix-LM attention's Triton kernels and their tile configs: the tiled path
(:func:`triton_forward`, :func:`triton_backward`, :func:`triton_sample_ids`) and the per-(sample,
head) path (:func:`triton_sample_forward`, :func:`triton_sample_backward`), and the host-side
rule that picks between them (:func:`uses_per_sample_kernels`, from ``max_seqlen``: no sync).

``PER_SAMPLE_MAX_SEQLEN`` and ``_wide_index`` are module globals read at call time: tests patch
them here.
"""

from __future__ import annotations

import torch

from ..common.backend import triton_available, triton_interpreting
from ..common.checks import needs_wide_index
from .checks import OP

if triton_available():
    import triton

    from .triton_kernels import (
        _bwd_dkdv_kernel,
        _bwd_dq_kernel,
        _bwd_preprocess_kernel,
        _fwd_kernel,
        _sample_bwd_kernel,
        _sample_fwd_kernel,
        _sample_ids_kernel,
    )


_LOG2E = 1.4426950408889634


def _triton_config(head_dim: int, override: dict | None = None, dtype=None) -> dict:
    """Tile sizes for ~100-token samples.

    BLOCK_M = 64 query rows: a block spans at most two or three samples, so the keys it visits
    but mostly masks (the beginning of the sample its first row sits in) stay under one tile;
    128-row blocks would double that waste for 75-115-token samples and halve the programs
    (T = 48k tokens x 12 heads still gives ~9k programs at 64). BLOCK_N = 64 keys: two key tiles
    cover a typical row's range. head_dim 128 keeps the same tiles (q, k, v tiles of 64 x 128
    bf16 = 16 KiB each fit the shared memory twice over for a 2-stage pipeline) with 8 warps to
    hold the 64 x 128 fp32 accumulator in registers. These were chosen by reasoning, not yet
    swept on a GPU; ``override`` lets the benchmarks and tests try others.

    fp32 inputs take the full-precision FMA dot, whose operands are twice as wide: at 64 x 64
    the sm_90 build spills 2.6 KB (forward) to 38 KB (dK/dV) per thread to local memory, at
    32 x 32 none in the forward and dQ and 1 KB in dK/dV (the sm_90 compile check,
    ``benchmarks/compile_check.py``); at head_dim 128, 8 warps leave 0.6 KB in the forward only.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d,
               num_warps=4 if block_d <= 64 else 8, num_stages=3 if block_d <= 64 else 2)
    if dtype == torch.float32:
        cfg.update(BLOCK_M=32, BLOCK_N=32, num_warps=4 if block_d <= 64 else 8, num_stages=2)
    if override:
        cfg.update(override)
    return cfg


def _dot_mode(dtype) -> int:
    if dtype == torch.float32:
        return 1
    if dtype == torch.bfloat16 and triton_interpreting():
        return 2
    return 0


def triton_sample_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """:func:`sample_ids` as one Triton launch (instead of five small PyTorch ops)."""
    cu = cu_seqlens.to(torch.int32).contiguous()
    seq_id = torch.empty(total_tokens, dtype=torch.int32, device=cu.device)
    n_samples = cu.numel() - 1
    if total_tokens and n_samples > 0:
        block = 1024
        _sample_ids_kernel[(triton.cdiv(total_tokens, block),)](
            cu, seq_id, total_tokens, n_samples, n_samples.bit_length() + 1, BLOCK=block)
    return seq_id


def _triton_meta(cu_seqlens, prefix_lens, T, seq_id=None):
    cu = cu_seqlens.to(torch.int32).contiguous()
    plen = prefix_lens.to(torch.int32).contiguous()
    if seq_id is None:
        seq_id = triton_sample_ids(cu, T)
    return seq_id, cu, plen


_wide_index = needs_wide_index  # a module name the tests can patch


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def triton_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale: float, config=None,
                   seq_id=None):
    """Launch the forward kernel. Returns (out [T, H, D], lse [H, T] fp32, log2 units).
    ``seq_id``: the tokens' sample ids when the caller has them (``triton_sample_ids``)."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    T, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    if T == 0 or H == 0:
        return out, lse
    seq_id, cu, plen = _triton_meta(cu_seqlens, prefix_lens, T, seq_id)
    cfg = _triton_config(D, config, q.dtype)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), H)
    _fwd_kernel[grid](
        q, k, v, out, lse, seq_id, cu, plen,
        T, softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        DOT=_dot_mode(q.dtype), WIDE_INDEX=_wide_index(q, k, v, out),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def triton_backward(do, q, k, v, out, lse, cu_seqlens, prefix_lens, softmax_scale: float,
                    config=None, seq_id=None):
    """Launch preprocess, dK/dV and dQ kernels. Returns (dq, dk, dv). ``seq_id`` as in
    :func:`triton_forward` (the op passes the forward's, so the backward launches no more)."""
    do, q, k, v, out = (_last_dim_contiguous(x) for x in (do, q, k, v, out))
    T, H, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if T == 0 or H == 0:
        return dq, dk, dv
    seq_id, cu, plen = _triton_meta(cu_seqlens, prefix_lens, T, seq_id)
    cfg = _triton_config(D, config, q.dtype)
    dot = _dot_mode(q.dtype)
    wide = _wide_index(do, q, k, v, out)
    delta = torch.empty((H, T), device=q.device, dtype=torch.float32)
    _bwd_preprocess_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), H)](
        out, do, delta, T, out.stride(0), out.stride(1), do.stride(0), do.stride(1),
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], WIDE_INDEX=wide,
    )
    qk_scale = softmax_scale * _LOG2E
    _bwd_dkdv_kernel[(triton.cdiv(T, cfg["BLOCK_N"]), H)](
        q, k, v, do, dk, dv, lse, delta, seq_id, cu, plen,
        T, qk_scale, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        DOT=dot, WIDE_INDEX=wide, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _bwd_dq_kernel[(triton.cdiv(T, cfg["BLOCK_M"]), H)](
        q, k, v, do, dq, lse, delta, seq_id, cu, plen,
        T, qk_scale, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
        DOT=dot, WIDE_INDEX=wide, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dq, dk, dv


#: Longest sample (``max_seqlen``) the per-(sample, head) kernels take: one program holds a
#: [BLOCK_M, BLOCK] score tile against every key of its sample, and past 128 keys it spills.
PER_SAMPLE_MAX_SEQLEN = 128
#: Largest head_dim the op sends to the per-sample kernels: the backward keeps k, v and the fp32
#: dK, dV of the whole sample in registers; at head_dim 128 it spills ~240 B per thread on sm_90
#: (the tiled kernels none), at 64 nothing.
PER_SAMPLE_MAX_HEAD_DIM = 64
#: Dtypes the op sends to the per-sample kernels. fp32 takes the full-precision FMA dot, whose
#: operands live in registers: its per-sample backward spills 24 KB per thread at BLOCK 128
#: (``benchmarks/compile_check.py``), so fp32 stays on the tiled kernels. (The
#: launchers themselves take fp32 too; the tests check it.)
PER_SAMPLE_DTYPES = (torch.float16, torch.bfloat16)


def uses_per_sample_kernels(max_seqlen: int, head_dim: int, dtype) -> bool:
    """Whether the op runs the per-(sample, head) kernels, decided on the host from the host int
    ``max_seqlen`` (no device sync); otherwise the tiled kernels."""
    return (0 < max_seqlen <= PER_SAMPLE_MAX_SEQLEN and head_dim <= PER_SAMPLE_MAX_HEAD_DIM
            and dtype in PER_SAMPLE_DTYPES)


def _per_sample_config(max_seqlen: int, head_dim: int, dtype=None, override: dict | None = None
                       ) -> dict:
    """Tiles of the per-sample kernels. BLOCK (keys, and the rows a program may own) = the next
    power of two >= max_seqlen, at least 16 (tl.dot's smallest tile): 128 for UniGen's 75-115
    tokens. BLOCK_M = BLOCK at 16 bits: a sample's queries are one [BLOCK, BLOCK] score tile
    (one slice, the loop runs once), so every dot has at least 64 rows at BLOCK >= 64 and
    compiles to Hopper's warpgroup MMA (``wgmma`` needs 64 rows per warpgroup). Measured by the
    sm_90 compile check (``benchmarks/compile_check.py``, the benchmark's batch, bf16, head_dim
    64, BLOCK 128, 8 warps, triton 3.6 / 3.9): forward 128 / 114 registers, 48 KB of shared
    memory; backward 192 / 209 registers, 96 KB; all five dots on wgmma, no local memory. The
    32-row slices before compiled to ``mma.sync`` (forward 32 of them, backward 48 beside 4
    wgmma); 64-row slices reach wgmma but the backward spills (48-112 B at 8 warps, 416 at 4):
    it carries dK and dV across slices; 4 or 16 warps at BLOCK 128 spill too. The price is score
    work on padding: a sample costs BLOCK rows (128 for a 75-token one, 96 with 32-row slices),
    8.4 M scores per head at the benchmark's batch against 7.3 M. BLOCK 64 (samples of at most
    64 tokens) takes 8 warps too (61-64 / 106-117 registers, wgmma); BLOCK <= 32 stays on
    mma.sync (fewer than 64 rows). fp32 (tests and sweeps only) takes 16-row slices.
    ``override`` lets the tile sweep and the tests try others (BLOCK may only grow: a program
    drops tokens past BLOCK).
    """
    block = max(16, triton.next_power_of_2(max_seqlen))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(block, 16) if dtype == torch.float32 else block
    cfg = dict(BLOCK=block, BLOCK_M=block_m, BLOCK_D=block_d,
               num_warps=8 if block * block_d >= 64 * 64 else 4, num_stages=1)
    if override:
        cfg.update(override)
    if cfg["BLOCK"] < max_seqlen:
        raise ValueError(f"{OP}: per-sample BLOCK = {cfg['BLOCK']} is smaller than max_seqlen = "
                         f"{max_seqlen}")
    return cfg


def triton_sample_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale: float,
                          max_seqlen: int, config=None):
    """Launch the per-(sample, head) forward (samples of at most ``max_seqlen`` <= 128 tokens).
    Returns (out [T, H, D], lse [H, T] fp32, log2 units), as :func:`triton_forward`."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    T, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((H, T), device=q.device, dtype=torch.float32)
    B = cu_seqlens.numel() - 1
    if T == 0 or H == 0 or B <= 0:
        return out, lse
    cu = cu_seqlens.to(torch.int32).contiguous()
    plen = prefix_lens.to(torch.int32).contiguous()
    cfg = _per_sample_config(max_seqlen, D, q.dtype, config)
    _sample_fwd_kernel[(B, H)](
        q, k, v, out, lse, cu, plen,
        T, softmax_scale * _LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK=cfg["BLOCK"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        DOT=_dot_mode(q.dtype),
        WIDE_INDEX=_wide_index(q, k, v, out),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def triton_sample_backward(do, q, k, v, lse, cu_seqlens, prefix_lens, softmax_scale: float,
                           max_seqlen: int, config=None):
    """Launch the single per-(sample, head) backward. Returns (dq, dk, dv)."""
    do, q, k, v = (_last_dim_contiguous(x) for x in (do, q, k, v))
    T, H, D = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    B = cu_seqlens.numel() - 1
    if T == 0 or H == 0 or B <= 0:
        return dq, dk, dv
    cu = cu_seqlens.to(torch.int32).contiguous()
    plen = prefix_lens.to(torch.int32).contiguous()
    cfg = _per_sample_config(max_seqlen, D, q.dtype, config)
    _sample_bwd_kernel[(B, H)](
        q, k, v, do, dq, dk, dv, lse, cu, plen,
        T, softmax_scale * _LOG2E, softmax_scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1),
        HEAD_DIM=D, BLOCK=cfg["BLOCK"], BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        DOT=_dot_mode(q.dtype),
        WIDE_INDEX=_wide_index(do, q, k, v, dq, dk, dv),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dq, dk, dv
