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
  length), k and v of the sample are loaded once, and all its queries meet every key in one
  [BLOCK, BLOCK] score tile, BLOCK = the next power of two >= max_seqlen (at least 16), so a
  row's softmax is one pass, with no running max and no rescaling across key tiles, and every
  dot has BLOCK >= 64 rows, so it compiles to Hopper's warpgroup MMA (``launch._per_sample_config``
  has the measured alternatives). The backward is ONE launch computing dV, dP, dS, dQ, dK from
  the one score tile (5 matmuls, nothing recomputed, dQ complete in its program: no atomics).
* otherwise: the **tiled** FlashAttention-2 kernels (64 x 64 tiles over the packed tokens, a
  block may straddle samples), which take any length.

Accounting for the benchmark's batch (512 samples of 75-115 tokens, mean 94.8, 48.5k tokens, 12
heads, head_dim 64, bf16; one [T, H, D] tensor = 74.5 MB), per-sample path vs tiled 64 x 64 vs
SDPA on the padded batch:

- scores computed per head: 8.4 M (512 samples x 128 x 128: one tile per sample; 7.3 M with the
  former 32-row slices, which compiled to mma.sync) vs 7.1-8.0 M (tiles crossing sample
  boundaries) vs 6.8 M (512 x 115^2); the mask keeps 2.4 M (causal) to 3.1 M (prefix-LM) of them;
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
Forward + backward: 7 x 2 x 8.4 M x 64 x 12 = 90 GFLOP (0.09 ms at 989 TFLOP/s) and 0.82 GB
(0.25 ms at 3.35 TB/s): bandwidth sets the floor on an H100 (``benchmarks/roofline.py``
compares it with the alternatives' floors).

Files of this package, in reading order:

- ``checks.py``: validation of (``cu_seqlens``, ``prefix_lens``, ``max_seqlen``) and the op's name;
- ``reference.py``: per-token sample ids and key ranges, the dense mask written from its
  definition and the readable dense-mask PyTorch reference (fp32 math; ``backend="torch"``);
- ``portable_backends.py``: SDPA on the padded batch (what ``backend="auto"`` runs on CPU),
  FlexAttention with a packed block mask, flash-attn and PyTorch varlen kernels;
- ``triton_kernels.py``: the ``@triton.jit`` kernels (tiled: forward, backward preprocess, dK/dV,
  dQ; per-sample: forward, backward; imported only where triton is installed);
- ``launch.py``: their launchers and tile configs, and the host-side choice between the two paths
  (:func:`uses_per_sample_kernels`);
- ``op.py``: the ``torch.library`` custom ops (forward + backward, fake kernels, autograd) and the
  eager ``autograd.Function``, the backend choice, the functional form
  :func:`prefix_lm_attention` and the module :class:`PrefixLMAttention`.

This file only re-exports.
"""

from .checks import check_cu_seqlens
from .launch import (
    triton_backward,
    triton_forward,
    triton_sample_backward,
    triton_sample_forward,
    triton_sample_ids,
    uses_per_sample_kernels,
)
from .op import (
    ATTENTION_BACKENDS,
    PrefixLMAttention,
    _resolve,  # noqa: F401 (the tests check the backend choice)
    prefix_lm_attention,
)
from .portable_backends import flash_attn_available, flex_block_mask, torch_varlen_available
from .reference import key_ranges, prefix_lm_attention_reference, prefix_lm_dense_mask, sample_ids

__all__ = [
    "prefix_lm_attention",
    "PrefixLMAttention",
    "ATTENTION_BACKENDS",
    "check_cu_seqlens",
    "sample_ids",
    "key_ranges",
    "prefix_lm_dense_mask",
    "prefix_lm_attention_reference",
    "flash_attn_available",
    "torch_varlen_available",
    "flex_block_mask",
    "triton_forward",
    "triton_backward",
    "triton_sample_forward",
    "triton_sample_backward",
    "triton_sample_ids",
    "uses_per_sample_kernels",
]
