"""Fused linear + vocabulary cross-entropy: ``F.cross_entropy(F.linear(h, W, b), y)`` without the
N×V logits.

Per valid row n (target t = target[n] != ignore_index), with logits z = h_n·Wᵀ + b:

    loss_n = lse(z) - (1-ε)·z_t - (ε/V)·Σ_j z_j + z_loss·lse(z)²

which equals PyTorch's label-smoothed cross-entropy plus the z-loss of PaLM. With ``softcap`` c > 0
(Gemma 2's ``final_logit_softcapping``) every logit is first replaced by z' = c·tanh(z/c), the
loss is that of z', and the logit gradient below is multiplied by ∂z'/∂z = 1 - (z'/c)².

The ops return the unreduced row losses; the reduction and ``token_weights`` are applied on top
with ordinary torch ops, so autograd hands the backward a per-row gradient ``g_n`` and every
reduction gets exact gradients from the same kernels:

    ∂loss/∂z_nj = g_n·[softmax(z)_j·(1 + 2·z_loss·lse) - (1-ε)·[j = t] - ε/V]

Two paths (the accounting is in each function's docstring):

- ``reduction="mean"``/``"sum"`` (and token weights without a gradient): the gradient of every
  row is known, up to the scalar upstream gradient, so one call computes the loss and the
  gradients in the forward and the backward only rescales them. On CUDA
  (:func:`triton_forward_reduced`) a cost model (``cost_model.py``: FLOPs, HBM bytes and working
  memory, against eager PyTorch's) picks per shape between row blocks (Liger-Kernel's scheme,
  6·N·D·V: tensor-core GEMMs for the logits of a block into one reused buffer with padded rows,
  ``_flce_rows_kernel`` for lse/loss/dZ in place, GEMMs for dH, ``_flce_dw_kahan_kernel`` for
  dW with compensated bf16 accumulation; an fp32 addmm for fp32 inputs) and vocabulary chunks
  (the ``reduction="none"`` kernels below with the row scale as upstream gradient, 8·N·D·V, dW
  written once per chunk), each as large as 1/8 of eager's working memory allows. On CPU
  (:func:`reference_forward_reduced`): the row-block scheme in torch, with ~660-row blocks. No
  double backward (create_graph) and one backward per graph: both refused with a clear error.
- ``reduction="none"`` (or token weights that need a gradient): fused Triton kernels that never
  write the logits (forward :func:`triton_forward`: online lse per tile, two row reductions per
  tile, the target logit gathered once outside the tile loop; backward :func:`triton_backward`:
  logits recomputed per vocabulary chunk, the gradient applied by GEMMs; 8·N·D·V in all), the
  vocabulary-chunked reference on CPU. 16-bit inputs take 128×128×32 tiles in grouped launch
  order (``TILE_CANDIDATES``, one pick per shape class and D, cached; the group's rows of H
  sized to stay in L2).

The argmax statistic (``return_stats``) is computed only when asked (the C++ op always does).

Every loss comes back in fp32 (fp64 for fp64 inputs), with or without autocast: one rule for the
ops (the contrastive loss and ``ClipLoss`` follow it too).

Autocast (``torch.autocast``, CPU and CUDA): hidden, weight and bias are cast to the autocast
dtype at entry, as autocast casts the inputs of the ``F.linear`` this op fuses; the math inside
stays fp32 (every backend runs with autocast disabled) and the loss comes back in fp32, as
autocast's ``F.cross_entropy`` does (see :mod:`unigen.kernels.common.autocast`).

Files of this package, in reading order:

- ``checks.py``: argument checking (shapes, dtypes, options, the target range) and the op's name;
- ``reference.py``: the readable PyTorch reference (fp32 math, vocabulary-chunked; the
  ``reduction="none"`` path on CPU) and the per-row pieces every PyTorch path shares;
- ``cpu.py``: the row-block PyTorch path of ``"mean"``/``"sum"``
  (:func:`reference_forward_reduced`: loss and gradients from one pass over the logits), what
  ``backend="auto"`` runs for those reductions on CPU;
- ``triton_kernels.py``: the ``@triton.jit`` kernels (imported only where triton is installed);
- ``cost_model.py``: the FLOPs, bytes and working memory of the reduced path's two strategies
  and of eager PyTorch (H100 datasheet numbers), and the choice between them
  (:func:`plan_reduced`); ``python -m unigen.kernels.fused_linear_cross_entropy.cost_model``
  prints the numbers at the GPT-2 and Llama-3 heads;
- ``launch.py``: their launchers (:func:`triton_forward`, :func:`triton_backward`,
  :func:`triton_forward_reduced`, which follows the cost model), the tile candidates and
  per-shape-class picks, the budgets and overrides, and the GEMM glue of the Triton paths;
- ``vocab_parallel.py``: the vocabulary-parallel path (each rank a slice of the vocabulary:
  per-row statistics all-gathered, dH all-reduced; its communication per call is in its
  docstring) and the reading of the user's setup (``process_group=``, DTensor weights) into
  local tensors and a slice;
- ``op.py``: the ``torch.library`` custom ops (forward, backward, fake kernels, autograd) that
  dispatch to the reference, the CPU path, the Triton launchers, the vocabulary-parallel path
  or the C++ op ``torch.ops.unigen.fused_linear_cross_entropy``, the functional form
  :func:`fused_linear_cross_entropy` (with per-class weights) and the module
  :class:`FusedLinearCrossEntropyLoss`.

This file only re-exports.
"""

from .cpu import reference_forward_reduced
from .launch import TILE_CANDIDATES, triton_backward, triton_forward, triton_forward_reduced
from .op import CrossEntropyStats, FusedLinearCrossEntropyLoss, fused_linear_cross_entropy
from .reference import reference_backward, reference_forward

__all__ = [
    "fused_linear_cross_entropy",
    "FusedLinearCrossEntropyLoss",
    "CrossEntropyStats",
    "reference_forward",
    "reference_backward",
    "reference_forward_reduced",
    "triton_forward",
    "triton_backward",
    "triton_forward_reduced",
    "TILE_CANDIDATES",
]
