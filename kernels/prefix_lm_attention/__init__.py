"""Packed variable-length prefix-LM attention (FlashAttention-2 style, in Triton).

The GPT-2 decoder of UniGen sees, per sample, a prefix (visual query tokens and/or XLM-R text
embeddings, then a task token) followed by the English target tokens: ~75-115 tokens, of very
different lengths per task. We pack the samples of a micro-batch into one sequence of
``total_tokens`` (sample ``i`` spans ``cu_seqlens[i]:cu_seqlens[i+1]``) and attend within each
sample only. Token ``t`` of sample ``i`` attends to the tokens ``s`` of sample ``i`` with ``s <= t``,
or with ``s`` and ``t`` both in the prefix (``< prefix_lens[i]``, positions counted from the sample
start). ``prefix_lens[i] == 0`` is plain causal attention; ``prefix_lens[i] == len(sample)`` is
fully bidirectional attention inside the sample.

The key observation the tiled kernels use: in that mask, the keys row ``t`` may attend form ONE
contiguous range of packed positions, ``[start(t), max(t + 1, start(t) + prefix(t)))``, and the
queries that attend key ``s`` form one contiguous range too, ``[s if s is a text token else
start(s), end(s))``. So the mask is two integers per token, computed on the device from
(``cu_seqlens``, ``prefix_lens``), and a block of queries only ever visits the key blocks between
its smallest start and its largest end: tiles outside that range (other samples, the future) are
never loaded.

Two Triton paths, chosen on the host from ``max_seqlen`` (a host int: no sync):

* ``max_seqlen <= 128`` (UniGen's case), fp16/bf16, head_dim <= 64: **per (sample, head)**. One
  program per (sample, head) owns all its queries and keys: the mask is one scalar (the prefix
  length), k and v of the sample are loaded once, and each slice of 32 query rows meets every key
  in one [32, BLOCK] score tile, BLOCK = the next power of two >= max_seqlen (at least 16), so a
  row's softmax is one pass, with no running max and no rescaling across key tiles. The backward
  is ONE launch computing dV, dP, dS, dQ, dK from one score tile per slice (5 matmuls, nothing
  recomputed, dQ complete in its program: no atomics).
* otherwise: the **tiled** FlashAttention-2 kernels below (64 x 64 tiles over the packed tokens,
  a block may straddle samples), which take any length.

Accounting for the benchmark's batch (512 samples of 75-115 tokens, mean 94.8, 48.5k tokens, 12
heads, head_dim 64, bf16; one [T, H, D] tensor = 74.5 MB), per-sample path vs tiled 64 x 64 vs
SDPA on the padded batch:

- scores computed per head: 7.3 M (the sum over samples of ceil(n / 32) * 32 rows x 128 keys)
  vs 7.1-8.0 M (tiles crossing sample boundaries) vs 6.8 M (512 x 115^2); the mask keeps 2.4 M
  (causal) to 3.1 M (prefix-LM) of them;
- matmuls per score: forward 2 / 2; backward 5 (S, dV, dP, dQ, dK) vs 7 (dK/dV kernel: S, dV,
  dP, dK; dQ kernel: S, dP, dQ);
- launches: forward 1 vs 2 (sample ids, forward); backward 1 vs 3 (preprocess, dK/dV, dQ);
- HBM traffic: forward reads q, k, v once and writes o (4 x 74.5 MB; the tiled kernels re-read
  k, v for every query block that visits them); backward reads q, k, v, dO and writes dq, dk,
  dv (7 x 74.5 MB), no O and no delta buffer (the tiled backward reads O and dO in its
  preprocess and q, k, v, dO again in each of its two kernels); lse is 2.3 MB each way.

So the per-sample path does not compute fewer scores than the padded batch at these lengths
(packing buys no score work when samples fill 75-115 of a 128 tile); what it saves is the online
softmax's rescaling, the dependent loads of per-row sample ids and ranges, two of the
backward's seven matmuls per score, three of five launches and the repeated reads of the inputs.
Forward + backward: 7 x 2 x 7.3 M x 64 x 12 = 79 GFLOP (0.10 ms at 790 TFLOP/s) and 0.82 GB
(0.19 ms at 4.3 TB/s): bandwidth sets the floor on an H200.

Layout of this file (the house pattern):

1. validation, per-token sample ids and mask ranges;
2. the readable dense-mask PyTorch reference (fp32 math) and the dense mask itself;
3. the portable backends: SDPA on the padded batch, FlexAttention, flash-attn varlen;
4. the Triton kernels (tiled: forward, backward preprocess, dK/dV, dQ; per-sample: forward,
   backward) and their launchers;
5. the ``torch.library`` custom ops (forward + backward, fake kernels, autograd);
6. the functional form ``prefix_lm_attention`` and the module ``PrefixLMAttention``.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..common.autocast import autocast_disabled, autocast_dtype, autocast_free, cast_inputs
from ..common.backend import resolve_backend, triton_available, triton_interpreting
from ..common.checks import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, needs_wide_index

OP = "prefix_lm_attention"

#: Every value ``backend=`` accepts. ``"torch"`` is the dense-mask reference (O(T^2) memory: tests
#: and small inputs only); ``"sdpa"`` pads the batch and calls PyTorch SDPA with a boolean mask;
#: ``"flex"`` is FlexAttention with a packed prefix-LM block mask; ``"flash_attn"`` the
#: flash-attn varlen kernel (two calls for prefix-LM); ``"torch_varlen"`` the same decomposition
#: over PyTorch's own varlen flash kernel; ``"cpp"`` has no implementation.
ATTENTION_BACKENDS = ("auto", "triton", "torch", "sdpa", "flex", "flash_attn", "torch_varlen", "cpp")

#: Dtypes the Triton kernels take (tl.dot has no float64 path on every GPU we target).
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Largest head_dim the Triton kernels handle (the q tile and the fp32 accumulator live in
#: registers; beyond 256 they spill).
TRITON_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------------------
# 1. validation, sample ids, per-token mask ranges
# ---------------------------------------------------------------------------------------------


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # older torch
        return False


def check_cu_seqlens(cu_seqlens, prefix_lens, total_tokens: int, *, op: str = OP, max_seqlen=None,
                     device=None):
    """Check the shapes and the values of (``cu_seqlens``, ``prefix_lens``); raise a clear error.

    The value checks read the tensors on the host (one transfer on CUDA, free on CPU).
    """
    check_tensor(cu_seqlens, "cu_seqlens", op=op, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_tensor(prefix_lens, "prefix_lens", op=op, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must hold at least 2 values (batch of >= 1 sample), "
                         f"got shape {tuple(cu_seqlens.shape)}")
    if prefix_lens.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"{op}: prefix_lens must have one value per sample (len(cu_seqlens) - 1 = "
                         f"{cu_seqlens.numel() - 1}), got shape {tuple(prefix_lens.shape)}")
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    pl = prefix_lens.detach().to("cpu", torch.int64)
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0:
        raise ValueError(f"{op}: cu_seqlens[0] must be 0, got {int(cu[0])}")
    if int(cu[-1]) != total_tokens:
        raise ValueError(f"{op}: cu_seqlens[-1] must equal total_tokens = {total_tokens} (the first "
                         f"dimension of the packed tensors), got {int(cu[-1])}")
    if bool((lengths < 0).any()):
        i = int(torch.nonzero(lengths < 0)[0])
        raise ValueError(f"{op}: cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}] = "
                         f"{int(cu[i + 1])} < cu_seqlens[{i}] = {int(cu[i])}")
    bad = (pl < 0) | (pl > lengths)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"{op}: prefix_lens[{i}] = {int(pl[i])} must lie in [0, length of sample "
                         f"{i} = {int(lengths[i])}]")
    if max_seqlen is not None and lengths.numel() and int(lengths.max()) > max_seqlen:
        i = int(torch.argmax(lengths))
        raise ValueError(f"{op}: max_seqlen = {max_seqlen} is smaller than the length of sample "
                         f"{i} ({int(lengths[i])})")


def sample_ids(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int32 [T]: the sample each packed token belongs to (no host sync: a device searchsorted)."""
    cu = cu_seqlens.to(torch.int32)
    tok = torch.arange(total_tokens, device=cu.device, dtype=torch.int32)
    sid = torch.searchsorted(cu, tok, right=True) - 1
    # Clamping keeps every later gather in bounds even for invalid cu_seqlens (validate=False).
    return sid.clamp_(0, max(cu.numel() - 2, 0)).to(torch.int32)


def key_ranges(cu_seqlens, prefix_lens, total_tokens: int):
    """Per query token t: the contiguous key range ``[lo[t], hi[t])`` it may attend (int64 [T])."""
    sid = sample_ids(cu_seqlens, total_tokens).long()
    start = cu_seqlens.long()[sid]
    t = torch.arange(total_tokens, device=cu_seqlens.device)
    hi = torch.maximum(t + 1, start + prefix_lens.long()[sid])
    return start, hi


# ---------------------------------------------------------------------------------------------
# 2. the dense-mask reference
# ---------------------------------------------------------------------------------------------


def prefix_lm_dense_mask(cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                         total_tokens: int) -> torch.Tensor:
    """bool [T, T]: ``mask[t, s]`` is True when packed token t may attend packed token s.

    Written from the definition (same sample, and causal or both-in-prefix), not from the
    contiguous-range shortcut the kernels use, so that the tests check the shortcut too.
    """
    check_cu_seqlens(cu_seqlens, prefix_lens, total_tokens, op="prefix_lm_dense_mask")
    sid = sample_ids(cu_seqlens, total_tokens).long()
    pos = torch.arange(total_tokens, device=cu_seqlens.device) - cu_seqlens.long()[sid]
    in_prefix = pos < prefix_lens.long()[sid]
    same_sample = sid[:, None] == sid[None, :]
    causal = pos[None, :] <= pos[:, None]
    both_prefix = in_prefix[:, None] & in_prefix[None, :]
    return same_sample & (causal | both_prefix)


def prefix_lm_attention_reference(q, k, v, cu_seqlens, prefix_lens, softmax_scale=None):
    """The readable reference: fp32 softmax(q k^T * scale + mask) v with the dense [T, T] mask.

    O(heads * T^2) memory: meant for tests and small inputs. Differentiable by autograd.
    """
    T, _, D = q.shape
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else float(softmax_scale)
    mask = prefix_lm_dense_mask(cu_seqlens, prefix_lens, T)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.einsum("thd,shd->hts", q.to(compute), k.to(compute)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hts,shd->thd", probs, v.to(compute))
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# 3. portable backends
# ---------------------------------------------------------------------------------------------


def _padded_index(cu_seqlens, total_tokens: int, max_seqlen: int):
    """Index maps between packed [T] and padded [B, L] layouts, built on device without syncs.

    Returns (gather [B, L] int64 packed index of each padded slot, clamped in bounds;
    valid [B, L] bool; scatter [T] int64 flat padded index of each packed token).
    """
    B = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    pos = torch.arange(max_seqlen, device=cu.device)
    lengths = cu[1:] - cu[:-1]
    valid = pos[None, :] < lengths[:, None]
    gather = (cu[:-1, None] + pos[None, :]).clamp_(0, max(total_tokens - 1, 0))
    sid = sample_ids(cu_seqlens, total_tokens).long()
    tok = torch.arange(total_tokens, device=cu.device)
    # clamped: with validate=False and a too small max_seqlen, wrong numbers but no bad index
    scatter = (sid * max_seqlen + (tok - cu[sid])).clamp_(0, max(B * max_seqlen - 1, 0))
    return gather, valid, scatter, B


def _sdpa_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, scale):
    """SDPA on the padded batch [B, H, L, D] with a boolean prefix-LM mask [B, 1, L, L]."""
    T, H, D = q.shape
    gather, valid, scatter, B = _padded_index(cu_seqlens, T, max_seqlen)
    L = max_seqlen

    def to_padded(x):
        x = x[gather.reshape(-1)].reshape(B, L, H, D)
        # zero the pad slots (they were filled from clamped indices) so no gradient leaks there
        x = torch.where(valid[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        return x.transpose(1, 2)

    pos = torch.arange(L, device=q.device)
    plen = prefix_lens.long()[:, None, None]
    qpos, kpos = pos[None, :, None], pos[None, None, :]
    # Pad query rows keep every real key (kpos <= qpos), so no row is fully masked (a fully masked
    # row is NaN in some SDPA kernels); their outputs are dropped and get zero gradient.
    allowed = ((kpos <= qpos) | ((kpos < plen) & (qpos < plen))) & valid[:, None, :]
    out = F.scaled_dot_product_attention(to_padded(q), to_padded(k), to_padded(v),
                                         attn_mask=allowed[:, None], scale=scale)
    return out.transpose(1, 2).reshape(B * L, H, D)[scatter]


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # default dynamism: the packed token count changes every batch, and after the first
    # recompile dynamo marks it dynamic instead of compiling once per count
    return torch.compile(flex_attention)


def flex_block_mask(cu_seqlens, prefix_lens, total_tokens: int, *, block_size: int = 128):
    """FlexAttention BlockMask of the packed prefix-LM mask (built from the per-token ranges)."""
    from torch.nn.attention.flex_attention import create_block_mask

    lo, hi = key_ranges(cu_seqlens, prefix_lens, total_tokens)

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= lo[q_idx]) & (kv_idx < hi[q_idx])

    # compiled mask construction on GPU: the eager path evaluates the mask_mod on all T x T pairs
    return create_block_mask(mask_mod, None, None, total_tokens, total_tokens,
                             device=cu_seqlens.device, BLOCK_SIZE=block_size,
                             _compile=cu_seqlens.is_cuda)


def _flex_forward(q, k, v, cu_seqlens, prefix_lens, scale):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type == "cpu" and torch.is_grad_enabled() and any(
            x.requires_grad for x in (q, k, v)):
        raise NotImplementedError(f"{OP}: backend='flex' has no backward on CPU in PyTorch's "
                                  "FlexAttention; use backend='sdpa' (or run without grad)")
    T = q.shape[0]
    block_mask = flex_block_mask(cu_seqlens, prefix_lens, T)
    # On GPU FlexAttention is only fast compiled; on CPU the eager (unfused) path is exact and
    # avoids a compile per new shape.
    fn = _compiled_flex_attention() if q.is_cuda else flex_attention
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = fn(qh, kh, vh, block_mask=block_mask, scale=scale)
    return out.squeeze(0).transpose(0, 1)


def _load_flash_attn_varlen():
    """flash-attn is optional and never imported at module import time."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as exc:
        raise RuntimeError(f"{OP}: backend='flash_attn' needs the flash-attn package "
                           f"(pip install flash-attn): {exc}") from exc
    return flash_attn_varlen_func


def _load_torch_varlen():
    """PyTorch's own flash varlen kernel (``torch.nn.attention.varlen``, CUDA, torch >= 2.10),
    adapted to flash_attn_varlen_func's calling convention."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise RuntimeError(f"{OP}: backend='torch_varlen' needs torch.nn.attention.varlen "
                           f"(PyTorch >= 2.10): {exc}") from exc
    import inspect

    params = inspect.signature(varlen_attn).parameters

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=None, causal=False):
        kwargs = {}
        if "window_size" in params:  # newer torch: causal = window (-1, 0)
            kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
        else:
            kwargs["is_causal"] = causal
        if "scale" in params:
            kwargs["scale"] = softmax_scale
        elif softmax_scale is not None and not math.isclose(softmax_scale, q.shape[-1] ** -0.5):
            raise ValueError(f"{OP}: this torch's varlen_attn has no scale argument; "
                             "backend='torch_varlen' needs softmax_scale = 1/sqrt(head_dim)")
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return varlen


def torch_varlen_available() -> bool:
    try:
        _load_torch_varlen()
        return torch.cuda.is_available()
    except RuntimeError:
        return False


def flash_attn_available() -> bool:
    try:
        _load_flash_attn_varlen()
        return True
    except RuntimeError:
        return False


def _flash_attn_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, scale, varlen_fn=None):
    """flash-attn varlen; prefix-LM as two calls.

    Text queries see every earlier key, prefix included: one causal call over whole samples
    gives them exactly (its prefix rows are discarded). Prefix queries see exactly the prefix
    keys of their sample: one non-causal call over the packed prefixes. Selecting the prefix
    tokens needs their count on the host: this backend syncs once per call.
    """
    fn = varlen_fn or _load_flash_attn_varlen()
    cu = cu_seqlens.to(torch.int32)
    out = fn(q, k, v, cu, cu, max_seqlen, max_seqlen, softmax_scale=scale, causal=True)
    T = q.shape[0]
    sid = sample_ids(cu, T).long()
    pos = torch.arange(T, device=q.device) - cu.long()[sid]
    in_prefix = pos < prefix_lens.long()[sid]
    idx = torch.nonzero(in_prefix).squeeze(1)  # host sync (the output size)
    if idx.numel() == 0:
        return out
    cu_prefix = F.pad(torch.cumsum(prefix_lens.to(torch.int32), 0, dtype=torch.int32), (1, 0))
    max_prefix = max_seqlen  # an upper bound is all flash-attn needs
    out_prefix = fn(q[idx], k[idx], v[idx], cu_prefix, cu_prefix, max_prefix, max_prefix,
                    softmax_scale=scale, causal=False)
    return out.index_copy(0, idx, out_prefix)


# ---------------------------------------------------------------------------------------------
# 4. Triton kernels
# ---------------------------------------------------------------------------------------------

if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _mm(a, b, DOT: tl.constexpr):
        # DOT = 0: tensor-core dot of fp16/bf16 tiles, fp32 accumulation.
        # DOT = 1: fp32 inputs, full-precision products (a TF32 dot would cost ~1e-3 relative
        #          error and break parity with the fp32 reference).
        # DOT = 2: bf16 under TRITON_INTERPRET=1, whose bf16 dot returns garbage (triton 3.9):
        #          the bf16 values upcast exactly, so the fp32 dot gives the same products.
        if DOT == 0:
            c = tl.dot(a, b)
        elif DOT == 1:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return c

    @triton.jit
    def _rne(x, DOT: tl.constexpr):
        # Under TRITON_INTERPRET=1 (DOT = 2), fp32 -> bf16 casts truncate, doubling bf16 error
        # compared with the GPU's round-to-nearest-even: round the fp32 bits here so that the
        # following truncating cast is exact. On a GPU this is the identity.
        if DOT == 2:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x

    @triton.jit
    def _offsets(idx, WIDE_INDEX: tl.constexpr):
        # Token indices for addressing: 64-bit only when T·H·D reaches 2^31 elements; the 64-bit
        # [rows, head_dim] address tiles cost registers (on sm_90 the forward needs 254 per
        # thread with them, 186 without, and the dK/dV kernel stops spilling).
        if WIDE_INDEX:
            idx = idx.to(tl.int64)
        return idx

    @triton.jit
    def _row_key_range(SEQ_ID, CU, PLEN, offs_m, T):
        """Per query row: [lo, hi) of the keys it may attend (clamped: memory-safe on bad input)."""
        row_ok = offs_m < T
        sid = tl.load(SEQ_ID + offs_m, mask=row_ok, other=0)
        start = tl.load(CU + sid, mask=row_ok, other=0)
        plen = tl.load(PLEN + sid, mask=row_ok, other=0)
        lo = tl.minimum(tl.maximum(start, 0), offs_m)
        hi = tl.minimum(tl.maximum(offs_m + 1, start + plen), T)
        lo = tl.where(row_ok, lo, T)
        hi = tl.where(row_ok, hi, 0)
        return lo, hi

    @triton.jit
    def _col_query_range(SEQ_ID, CU, PLEN, offs_n, T):
        """Per key column s: [lo, hi) of the queries that attend it (mirror of _row_key_range)."""
        col_ok = offs_n < T
        sid = tl.load(SEQ_ID + offs_n, mask=col_ok, other=0)
        start = tl.load(CU + sid, mask=col_ok, other=0)
        end = tl.load(CU + sid + 1, mask=col_ok, other=0)
        plen = tl.load(PLEN + sid, mask=col_ok, other=0)
        # a prefix key is seen by the whole sample, a text key by itself and what follows
        lo = tl.where(offs_n < start + plen, start, offs_n)
        lo = tl.minimum(tl.maximum(lo, 0), offs_n)
        hi = tl.minimum(tl.maximum(end, offs_n + 1), T)
        lo = tl.where(col_ok, lo, T)
        hi = tl.where(col_ok, hi, 0)
        return lo, hi

    @triton.jit
    def _sample_ids_kernel(CU, SEQ_ID, T, n_samples, steps, BLOCK: tl.constexpr):
        """``sample_ids`` in one launch: per token t, the largest i with cu[i] <= t (a binary
        search of ``steps`` = bit_length(B) + 1 halvings over cu[0..B]), clamped to [0, B - 1].
        Every probe stays inside cu whatever its values, so invalid cu_seqlens give in-range
        ids (wrong numbers, never a crash), as the clamp of the PyTorch version does."""
        t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = tl.full([BLOCK], 1, dtype=tl.int32) * (n_samples + 1)
        for _ in range(steps):
            mid = (lo + hi) // 2  # lo <= mid < hi <= B + 1 while hi > lo + 1; lo once they meet
            go = tl.load(CU + mid) <= t
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        tl.store(SEQ_ID + t, tl.minimum(lo, n_samples - 1), mask=t < T)

    @triton.jit
    def _fwd_kernel(
        Q, K, V, O, LSE, SEQ_ID, CU, PLEN,
        T, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ):
        # grid = (query blocks over the packed tokens, heads). A block may straddle several short
        # samples: every row carries its own key range, and the block visits the union.
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < T
        d_ok = offs_d < HEAD_DIM
        lo_m, hi_m = _row_key_range(SEQ_ID, CU, PLEN, offs_m, T)
        lo = tl.min(lo_m, axis=0)
        hi = tl.max(hi_m, axis=0)

        rows = _offsets(offs_m, WIDE_INDEX)
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        # Online softmax in base 2: qk_scale already holds softmax_scale * log2(e), so exp2 is
        # one instruction and the stored LSE is in log2 units as well.
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            cols = _offsets(offs_n, WIDE_INDEX)
            col_ok = offs_n < hi
            k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            s = _mm(q, tl.trans(k), DOT) * qk_scale
            allowed = (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] < hi_m[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # a row with no allowed key yet keeps m = -inf: shift by 0 instead (no inf - inf NaN)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + _mm(_rne(p, DOT).to(v.dtype), v, DOT)
            m_i = m_new
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        acc = acc / l_safe[:, None]
        tl.store(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 _rne(acc, DOT).to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        tl.store(LSE + h * T + offs_m, m_i + tl.log2(l_safe), mask=row_ok)

    @triton.jit
    def _bwd_preprocess_kernel(
        O, DO, DELTA, T,
        stride_ot, stride_oh, stride_dot, stride_doh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        WIDE_INDEX: tl.constexpr,
    ):
        # delta = rowsum(dO * O) in fp32: the softmax-backward term shared by dK/dV and dQ.
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
        rows = _offsets(offs_m, WIDE_INDEX)
        o = tl.load(O + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                     other=0.0).to(tl.float32)
        tl.store(DELTA + h * T + offs_m, tl.sum(o * do, axis=1), mask=offs_m < T)

    @triton.jit
    def _bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, SEQ_ID, CU, PLEN,
        T, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ):
        # grid = (key blocks, heads); each program owns dK, dV of its keys (no atomics) and
        # visits only the query blocks that attend them: the rest of the sample after a text
        # key, the whole sample for a prefix key.
        pid_n = tl.program_id(0)
        h = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < T
        d_ok = offs_d < HEAD_DIM
        lo_n, hi_n = _col_query_range(SEQ_ID, CU, PLEN, offs_n, T)
        lo = tl.min(lo_n, axis=0)
        hi = tl.max(hi_n, axis=0)

        cols = _offsets(offs_n, WIDE_INDEX)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rows = _offsets(offs_m, WIDE_INDEX)
            row_ok = offs_m < hi
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=q_mask, other=0.0)
            do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse = tl.load(LSE + h * T + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(DELTA + h * T + offs_m, mask=row_ok, other=0.0)
            # work on the transposed tile (keys x queries) so dK and dV come out of plain dots
            s_t = _mm(k, tl.trans(q), DOT) * qk_scale
            allowed = (offs_m[None, :] >= lo_n[:, None]) & (offs_m[None, :] < hi_n[:, None])
            p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
            dv += _mm(_rne(p_t, DOT).to(do.dtype), do, DOT)
            dp_t = _mm(v, tl.trans(do), DOT)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _mm(_rne(ds_t, DOT).to(q.dtype), q, DOT)
        dk = dk * sm_scale
        tl.store(DK + cols[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
                 _rne(dk, DOT).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + cols[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
                 _rne(dv, DOT).to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, SEQ_ID, CU, PLEN,
        T, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dqt, stride_dqh,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ):
        # grid = (query blocks, heads), the same key ranges as the forward; recomputes P from
        # the saved LSE instead of storing it.
        pid_m = tl.program_id(0)
        h = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < T
        d_ok = offs_d < HEAD_DIM
        lo_m, hi_m = _row_key_range(SEQ_ID, CU, PLEN, offs_m, T)
        lo = tl.min(lo_m, axis=0)
        hi = tl.max(hi_m, axis=0)

        rows = _offsets(offs_m, WIDE_INDEX)
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=q_mask,
                    other=0.0)
        do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + h * T + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            cols = _offsets(offs_n, WIDE_INDEX)
            col_ok = offs_n < hi
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = tl.load(K + cols[:, None] * stride_kt + h * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vt + h * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            s = _mm(q, tl.trans(k), DOT) * qk_scale
            allowed = (offs_n[None, :] >= lo_m[:, None]) & (offs_n[None, :] < hi_m[:, None])
            p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            dp = _mm(do, tl.trans(v), DOT)
            ds = p * (dp - delta[:, None])
            dq += _mm(_rne(ds, DOT).to(k.dtype), k, DOT)
        dq = dq * sm_scale
        tl.store(DQ + rows[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                 _rne(dq, DOT).to(DQ.dtype.element_ty), mask=q_mask)

    @triton.jit
    def _sample_span(CU, PLEN, b, T, BLOCK: tl.constexpr):
        """Sample b's packed start, its length (at most BLOCK), its prefix length and its true
        length, clamped so that bad metadata (validate=False) gives wrong numbers, never an
        out-of-bounds access."""
        start = tl.minimum(tl.maximum(tl.load(CU + b), 0), T)
        end = tl.minimum(tl.maximum(tl.load(CU + b + 1), start), T)
        n = tl.minimum(end - start, BLOCK)
        plen = tl.load(PLEN + b)
        return start, n, plen, end - start

    @triton.jit
    def _sample_keys(K, V, start, n, h, stride_kt, stride_kh, stride_vt, stride_vh,
                     HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                     WIDE_INDEX: tl.constexpr):
        """All keys and values of one sample's head, loaded once into a [BLOCK, BLOCK_D] tile
        (rows past the sample and columns past head_dim are 0), with the offsets and masks the
        per-sample kernels index by."""
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        tok_n = _offsets(start + offs_n, WIDE_INDEX)
        kv_mask = (offs_n < n)[:, None] & d_ok[None, :]
        k = tl.load(K + tok_n[:, None] * stride_kt + h * stride_kh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        v = tl.load(V + tok_n[:, None] * stride_vt + h * stride_vh + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        return offs_n, offs_d, d_ok, tok_n, kv_mask, k, v

    @triton.jit
    def _poison_rows(X, stride_t, start, n, full, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, WIDE_INDEX: tl.constexpr):
        # Rows n..full of a sample longer than the tile (max_seqlen too small, validate=False)
        # become NaN instead of whatever the output buffer held: the error shows in the loss.
        # No iteration for valid input.
        offs_d = tl.arange(0, BLOCK_D)
        for m0 in range(n, full, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            tok = _offsets(start + offs_m, WIDE_INDEX)
            mask = (offs_m < full)[:, None] & (offs_d < HEAD_DIM)[None, :]
            nan = tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32)
            tl.store(X + tok[:, None] * stride_t + offs_d[None, :], nan.to(X.dtype.element_ty),
                     mask=mask)

    @triton.jit
    def _sample_mask(offs_m, offs_n, n, plen):
        # Local row r may attend local column c when c <= r or c is in the prefix (c < plen):
        # the whole prefix-LM mask of one sample is this one scalar. Pad rows/columns (>= n) are
        # masked; every real row keeps its diagonal, so no real row is fully masked.
        rows = offs_m[:, None]
        cols = offs_n[None, :]
        return ((cols <= rows) | (cols < plen)) & (cols < n) & (rows < n)

    @triton.jit
    def _sample_fwd_kernel(
        Q, K, V, O, LSE, CU, PLEN,
        T, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ):
        # grid = (samples, heads): one program owns all queries and all keys of its sample. k and
        # v are loaded once; the queries go by in slices of BLOCK_M rows, each against every key
        # of the sample in one [BLOCK_M, BLOCK] score tile, so the softmax of a row is one pass
        # (no running max, no rescaling of the accumulator), and slices past the sample's length
        # are never computed (a 75-token sample at BLOCK_M = 32 costs 96 rows, not 128).
        b = tl.program_id(0)
        h = tl.program_id(1)
        start, n, plen, full = _sample_span(CU, PLEN, b, T, BLOCK)
        offs_n, offs_d, d_ok, tok_n, kv_mask, k, v = _sample_keys(
            K, V, start, n, h, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK,
            BLOCK_D, WIDE_INDEX)
        for m0 in range(0, n, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            tok_m = _offsets(start + offs_m, WIDE_INDEX)
            q_mask = (offs_m < n)[:, None] & d_ok[None, :]
            q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=q_mask, other=0.0)
            s = _mm(q, tl.trans(k), DOT) * qk_scale
            s = tl.where(_sample_mask(offs_m, offs_n, n, plen), s, float("-inf"))
            m = tl.max(s, axis=1)
            m = tl.where(m == float("-inf"), 0.0, m)  # pad rows: exp2(-inf) = 0, no NaN
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, axis=1)
            l = tl.where(l > 0.0, l, 1.0)
            acc = _mm(_rne(p, DOT).to(v.dtype), v, DOT) / l[:, None]
            tl.store(O + tok_m[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                     _rne(acc, DOT).to(O.dtype.element_ty), mask=q_mask)
            tl.store(LSE + h * T + start + offs_m, m + tl.log2(l), mask=offs_m < n)
        _poison_rows(O + h * stride_oh, stride_ot, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                     WIDE_INDEX)

    @triton.jit
    def _sample_bwd_kernel(
        Q, K, V, DO, DQ, DK, DV, LSE, CU, PLEN,
        T, qk_scale, sm_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_dot, stride_doh, stride_dqt, stride_dqh, stride_dkt, stride_dkh,
        stride_dvt, stride_dvh,
        HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr, DOT: tl.constexpr, WIDE_INDEX: tl.constexpr,
    ):
        # grid = (samples, heads), the whole backward in one launch. Per slice of BLOCK_M
        # queries, from one score tile against all keys of the sample: S = Q K^T,
        # P = exp2(S - lse), dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(P dP)),
        # dQ = dS K (complete: the slice saw every key it may attend, so it is stored at once),
        # dK += dS^T Q: five matmuls, nothing recomputed. The program owns every query and key
        # of its sample, so no atomics and no second pass. rowsum(P * dP) equals rowsum(dO * O)
        # and needs neither O nor a preprocess launch.
        b = tl.program_id(0)
        h = tl.program_id(1)
        start, n, plen, full = _sample_span(CU, PLEN, b, T, BLOCK)
        offs_n, offs_d, d_ok, tok_n, kv_mask, k, v = _sample_keys(
            K, V, start, n, h, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM, BLOCK,
            BLOCK_D, WIDE_INDEX)
        dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        for m0 in range(0, n, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            tok_m = _offsets(start + offs_m, WIDE_INDEX)
            q_mask = (offs_m < n)[:, None] & d_ok[None, :]
            q = tl.load(Q + tok_m[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=q_mask, other=0.0)
            do = tl.load(DO + tok_m[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                         mask=q_mask, other=0.0)
            lse = tl.load(LSE + h * T + start + offs_m, mask=offs_m < n, other=0.0)
            s = _mm(q, tl.trans(k), DOT) * qk_scale
            p = tl.where(_sample_mask(offs_m, offs_n, n, plen), tl.exp2(s - lse[:, None]), 0.0)
            dv += _mm(tl.trans(_rne(p, DOT).to(do.dtype)), do, DOT)
            dp = _mm(do, tl.trans(v), DOT)
            delta = tl.sum(p * dp, axis=1)
            ds = _rne(p * (dp - delta[:, None]), DOT).to(q.dtype)
            dq = _mm(ds, k, DOT) * sm_scale
            tl.store(DQ + tok_m[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
                     _rne(dq, DOT).to(DQ.dtype.element_ty), mask=q_mask)
            dk += _mm(tl.trans(ds), q, DOT)
        dk = dk * sm_scale
        tl.store(DK + tok_n[:, None] * stride_dkt + h * stride_dkh + offs_d[None, :],
                 _rne(dk, DOT).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + tok_n[:, None] * stride_dvt + h * stride_dvh + offs_d[None, :],
                 _rne(dv, DOT).to(DV.dtype.element_ty), mask=kv_mask)
        _poison_rows(DQ + h * stride_dqh, stride_dqt, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                     WIDE_INDEX)
        _poison_rows(DK + h * stride_dkh, stride_dkt, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                     WIDE_INDEX)
        _poison_rows(DV + h * stride_dvh, stride_dvt, start, n, full, HEAD_DIM, BLOCK_M, BLOCK_D,
                     WIDE_INDEX)


_LOG2E = 1.4426950408889634
# read once: torch.compile traces _resolve and would warn about the lru_cache of the function
_HAS_TRITON = triton_available()


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
    32 x 32 none in the forward and dQ and 1 KB in dK/dV (``tests/kernels/gpu_compile_check.py
    attention fp32 64``); at head_dim 128, 8 warps leave 0.6 KB in the forward only.
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
#: (``gpu_compile_check.py attention fp32 64``), so fp32 stays on the tiled kernels. (The
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
    tokens. BLOCK_M = 32 query rows per score tile: the loop over a sample's rows stops at its
    length, so a sample costs ceil(len / 32) * 32 rows (96 for a 95-token one, not 128), and the
    backward's P and dP tiles stay small enough for 8 warps to hold them with the fp32 dK, dV
    of the sample: on sm_90 at bf16, head_dim 64, BLOCK 128 the forward uses 114 registers, the
    backward 210, no spills (BLOCK_M 64: 188 / 255 and 140 B of spills; 4 warps: 412 B). fp32
    (tests and sweeps only) takes 16-row tiles. ``override`` lets the tile sweep and the tests
    try others (BLOCK may only grow: a program drops tokens past BLOCK).
    """
    block = max(16, triton.next_power_of_2(max_seqlen))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m = min(block, 16 if dtype == torch.float32 else 32)
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


# ---------------------------------------------------------------------------------------------
# 5. torch.library custom ops: torch.compile sees two opaque ops with fake kernels and an
#    autograd formula, so it traces through without graph breaks.
# ---------------------------------------------------------------------------------------------


@autocast_free  # the kernels keep their own dtypes under autocast (its rule is applied at entry)
def _forward_impl(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
    """(out, lse, seq_id). Samples of at most 128 tokens: the per-sample kernel, which needs no
    sample ids (``seq_id`` is empty). Longer: the tiled kernels, whose sample ids are computed
    once here and saved for the backward."""
    if uses_per_sample_kernels(max_seqlen, q.shape[-1], q.dtype):
        out, lse = triton_sample_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale,
                                         max_seqlen)
        return out, lse, q.new_empty((0,), dtype=torch.int32)
    seq_id = triton_sample_ids(cu_seqlens, q.shape[0])
    out, lse = triton_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale, seq_id=seq_id)
    return out, lse, seq_id


@autocast_free
def _backward_impl(do, q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id, max_seqlen,
                   softmax_scale):
    """(dq, dk, dv) on the path the forward took (the same host-side rule)."""
    if uses_per_sample_kernels(max_seqlen, q.shape[-1], q.dtype):
        return triton_sample_backward(do, q, k, v, lse, cu_seqlens, prefix_lens, softmax_scale,
                                      max_seqlen)
    return triton_backward(do, q, k, v, out, lse, cu_seqlens, prefix_lens, softmax_scale,
                           seq_id=seq_id)


@torch.library.custom_op("unigen::prefix_lm_attention_fwd", mutates_args=())
def _prefix_lm_attention_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                                max_seqlen: int, softmax_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)


@_prefix_lm_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
    T, H, D = q.shape
    n_ids = 0 if uses_per_sample_kernels(max_seqlen, D, q.dtype) else T
    return (torch.empty_like(q), q.new_empty((H, T), dtype=torch.float32),
            q.new_empty((n_ids,), dtype=torch.int32))


@torch.library.custom_op("unigen::prefix_lm_attention_bwd", mutates_args=())
def _prefix_lm_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                cu_seqlens: torch.Tensor, prefix_lens: torch.Tensor,
                                seq_id: torch.Tensor, max_seqlen: int, softmax_scale: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(do, q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id, max_seqlen,
                          softmax_scale)


@_prefix_lm_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id, max_seqlen, softmax_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale = inputs
    out, lse, seq_id = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id)
    ctx.max_seqlen = max_seqlen
    ctx.softmax_scale = softmax_scale
    ctx.mark_non_differentiable(lse, seq_id)


def _backward(ctx, grad_out, *unused_grads):
    dq, dk, dv = _prefix_lm_attention_bwd_op(grad_out.contiguous(), *ctx.saved_tensors,
                                             ctx.max_seqlen, ctx.softmax_scale)
    return dq, dk, dv, None, None, None, None


_prefix_lm_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _PrefixLMAttentionFunction(torch.autograd.Function):
    """The same forward and backward for eager mode, without the custom-op dispatcher.

    At the decoder's sizes (~50k packed tokens, 12 heads, head_dim 64) the kernels of one
    forward + backward take a few hundred microseconds on a GPU, so host time counts: the
    custom-op path adds ~40 µs of dispatch per forward + backward (measured on CPU) and a
    zero-filled gradient for ``lse``. ``prefix_lm_attention`` takes the custom op while
    torch.compile traces and this Function otherwise; both run the same launchers."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
        inputs = (q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
        output = _forward_impl(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
        _setup_context(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # no zero-filled gradients for lse and seq_id
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, *unused_grads):
        q, k, v, out, lse, cu_seqlens, prefix_lens, seq_id = ctx.saved_tensors
        dq, dk, dv = _backward_impl(grad_out.contiguous(), q, k, v, out, lse, cu_seqlens,
                                    prefix_lens, seq_id, ctx.max_seqlen, ctx.softmax_scale)
        return dq, dk, dv, None, None, None, None


# ---------------------------------------------------------------------------------------------
# 6. public API
# ---------------------------------------------------------------------------------------------


def _resolve(backend: str, q: torch.Tensor) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"{OP}: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if q.is_cuda:
            if _HAS_TRITON and q.dtype in TRITON_DTYPES and q.shape[-1] <= TRITON_MAX_HEAD_DIM:
                return "triton"
            if flash_attn_available() and q.dtype in (torch.float16, torch.bfloat16):
                return "flash_attn"
        # CPU (even under TRITON_INTERPRET=1, whose kernels are slow): SDPA on the padded batch
        # is the fastest exact portable path (B * L^2 scores instead of the reference's T^2).
        return "sdpa"
    if backend in ("triton", "cpp"):
        if backend == "cpp" or not _HAS_TRITON or not (q.is_cuda or triton_interpreting()):
            resolve_backend(backend, q.device, op=OP, has_cpp=False)  # raises the clear errors
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"{OP}: backend='triton' takes float16, bfloat16 or float32 q, k, v; "
                            f"got {str(q.dtype).replace('torch.', '')}")
        if q.shape[-1] > TRITON_MAX_HEAD_DIM:
            raise ValueError(f"{OP}: backend='triton' supports head_dim <= {TRITON_MAX_HEAD_DIM}, "
                             f"got {q.shape[-1]}")
    if backend in ("flash_attn", "torch_varlen"):
        (_load_flash_attn_varlen if backend == "flash_attn" else _load_torch_varlen)()
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"{OP}: backend={backend!r} needs float16/bfloat16 CUDA tensors, got "
                             f"{str(q.dtype).replace('torch.', '')} on {q.device.type}")
    return backend


def prefix_lm_attention(q, k, v, cu_seqlens, prefix_lens, *, max_seqlen, softmax_scale=None,
                        backend="auto", validate=None):
    """Packed variable-length prefix-LM attention.

    Args:
        q, k, v: ``[total_tokens, heads, head_dim]``, same shape, dtype and device
            (float16/bfloat16/float32; float64 on the PyTorch backends only).
        cu_seqlens: int32/int64 ``[B + 1]``: sample i spans ``cu_seqlens[i]:cu_seqlens[i+1]``;
            ``cu_seqlens[0] = 0``, non-decreasing, ``cu_seqlens[-1] = total_tokens``.
        prefix_lens: int32/int64 ``[B]``, ``0 <= prefix_lens[i] <= len(sample i)``: the first
            ``prefix_lens[i]`` tokens of sample i attend each other bidirectionally; every later
            token attends the prefix and the tokens before it. 0 is plain causal attention.
        max_seqlen: Python int, at least the longest sample: the padded backends pad to it, and
            it picks the Triton path on the host (<= 128: the per-sample kernels, whose tile it
            sizes; they never read tokens of a sample past it, so with a too small value and
            ``validate=False`` those rows of the output and the gradients are NaN: the loss
            shows the error, nothing crashes or reads out of bounds).
        softmax_scale: defaults to ``1 / sqrt(head_dim)``.
        backend: one of :data:`ATTENTION_BACKENDS`.
        validate: check the values of ``cu_seqlens``/``prefix_lens``/``max_seqlen`` (reads them
            on the host). ``None`` = on CPU tensors only, never inside ``torch.compile``; on CUDA
            the check would cost a device sync per call, so it is off unless asked for (the
            Triton kernels clamp every index, so bad values give wrong numbers, never a crash).

    Autocast: under ``torch.autocast`` q, k and v are cast to the autocast dtype (as autocast casts
    ``scaled_dot_product_attention``'s), every backend then runs with autocast disabled (fp32
    softmax statistics as without autocast), and the output has the autocast dtype.

    Returns:
        ``[total_tokens, heads, head_dim]`` in the dtype of ``q`` (the autocast dtype under autocast).
    """
    if isinstance(q, torch.Tensor):
        q, k, v = cast_inputs(autocast_dtype(q.device), q, k, v)
    check_tensor(q, "q", op=OP, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(k, "k", op=OP, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor(v, "v", op=OP, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{OP}: {name} must have the shape of q {tuple(q.shape)}, got "
                             f"{tuple(x.shape)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{OP}: {name} must have the dtype of q "
                            f"({str(q.dtype).replace('torch.', '')}), got "
                            f"{str(x.dtype).replace('torch.', '')}")
    check_tensor(cu_seqlens, "cu_seqlens", op=OP, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    check_tensor(prefix_lens, "prefix_lens", op=OP, ndim=1, dtypes=INDEX_DTYPES, device=q.device)
    if prefix_lens.numel() != cu_seqlens.numel() - 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{OP}: cu_seqlens [B + 1] and prefix_lens [B] disagree: shapes "
                         f"{tuple(cu_seqlens.shape)} and {tuple(prefix_lens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{OP}: max_seqlen must be a non-negative Python int, got {max_seqlen!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    elif not isinstance(softmax_scale, (int, float)) or isinstance(softmax_scale, bool) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"{OP}: softmax_scale must be a positive finite number, got {softmax_scale!r}")
    softmax_scale = float(softmax_scale)
    T = q.shape[0]
    if validate is None:
        validate = q.device.type == "cpu" and not _is_compiling()
    if validate:
        check_cu_seqlens(cu_seqlens, prefix_lens, T, max_seqlen=max_seqlen)

    be = _resolve(backend, q)
    with autocast_disabled(q.device):
        return _dispatch(be, q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)


def _dispatch(be, q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale):
    T = q.shape[0]
    if be == "triton":
        # torch.compile traces the custom op; eager mode skips its dispatcher
        op = (_prefix_lm_attention_fwd_op if _is_compiling()
              else _PrefixLMAttentionFunction.apply)
        return op(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)[0]
    if be == "torch":
        return prefix_lm_attention_reference(q, k, v, cu_seqlens, prefix_lens, softmax_scale)
    if T == 0:
        return torch.empty_like(q)
    if be == "sdpa":
        return _sdpa_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale)
    if be == "flex":
        return _flex_forward(q, k, v, cu_seqlens, prefix_lens, softmax_scale)
    varlen_fn = _load_torch_varlen() if be == "torch_varlen" else None
    return _flash_attn_forward(q, k, v, cu_seqlens, prefix_lens, max_seqlen, softmax_scale,
                               varlen_fn=varlen_fn)


class PrefixLMAttention(torch.nn.Module):
    """Module form of :func:`prefix_lm_attention` (holds the scale and the backend)."""

    def __init__(self, softmax_scale=None, backend="auto"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"{OP}: backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.softmax_scale = softmax_scale
        self.backend = backend

    def forward(self, q, k, v, cu_seqlens, prefix_lens, *, max_seqlen):
        return prefix_lm_attention(q, k, v, cu_seqlens, prefix_lens, max_seqlen=max_seqlen,
                                   softmax_scale=self.softmax_scale, backend=self.backend)

    def extra_repr(self):
        return f"softmax_scale={self.softmax_scale}, backend={self.backend!r}"
