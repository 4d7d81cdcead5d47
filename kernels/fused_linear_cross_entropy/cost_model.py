"""The cost model of the fused cross-entropy's "mean"/"sum" path on a GPU: FLOPs, HBM bytes and
working memory of each way to run it, of eager PyTorch's formula at the same shape, and the
choice between them (:func:`plan_reduced`, which :func:`.launch.triton_forward_reduced` follows).

N rows, D hidden, V vocabulary; ``e`` bytes per input element (2 for bf16/fp16, 4 for fp32),
``l`` per logit of a materialised block (``e``, or 4 for the fp32 logits of autocast). Two
strategies give the loss and, in the same call, the gradients:

**rows** (Liger-Kernel's scheme): per block of R rows (k = ⌈N/R⌉ blocks) a GEMM writes the
block's logits [R, V] (row stride padded to a multiple of 64 elements so the row kernel moves
16-byte vectors), the row kernel computes lse, the loss and dZ in place (two reads, one write),
a GEMM gives dH of the block, and ``_flce_dw_kahan_kernel`` adds dZᵀ·H to dW with compensated
16-bit summation (an fp32 addmm for fp32 inputs). 6·N·D·V matmul FLOPs. Per block W is read by
two GEMMs and dW's sum and compensation are read and written: the W-sized traffic is
k·(2·V·D·e + 8·V·D), so R should be as large as the memory allows. Working memory: the block
(R·V·l), the bf16 compensation (2·V·D, for a 16-bit dW), per-row vectors.

**vocab_chunks** (the ``reduction="none"`` kernels, with the row scale as the upstream
gradient): ``_flce_forward_kernel`` computes lse and the loss without writing any logit, then per
vocabulary chunk of C columns ``_flce_logit_grad_kernel`` recomputes the logits and writes dZ
[N, C], and two GEMMs apply it: dH += dZ·W_c into an fp32 accumulator, dW_c = dZᵀ·H written
once (one rounding, as PyTorch's own dW). 8·N·D·V matmul FLOPs (the logits twice). The fused
kernels run row blocks of 128 in groups of G (``group_rows``: the rows of H a group shares stay
in L2) and each group streams W once: ⌈N/(128·G)⌉·V·D·e per sweep. Working memory: dZ (N·C·e),
the fp32 dH (4·N·D), per-row vectors.

**eager** PyTorch, ``F.cross_entropy(F.linear(h, W), y)`` forward + backward: 6·N·D·V FLOPs;
the logits, the log-softmax and its gradient are three [N, V] tensors alive together in the
backward (working memory 3·N·V·e), and nine [N, V] passes move through HBM (linear writes Z,
log_softmax reads it and writes its output, nll's backward writes a zero-filled gradient,
log_softmax's backward reads two and writes one, the dH and dW GEMMs read it), plus W twice.

Time: ``floor_s`` is the roofline of the whole call, max(matmul FLOPs / peak, HBM bytes /
bandwidth), the number compared across implementations in docs/benchmarks.md; ``serial_s`` sums
the roofline of each launch (launches run one after the other, so a memory-bound row kernel
does not hide behind a GEMM), a closer estimate of what a GPU will measure. FLOPs are the
matmuls' (the elementwise work, a few operations per logit, runs beside them on other units).
Bytes count each HBM pass a launch makes over its operands (a GEMM reads its operands once; L2
reuse inside a launch is not counted, across launches only where said). Hardware: an H100
SXM's datasheet (989 TFLOP/s dense bf16/fp16, 67 TFLOP/s fp32 without tensor cores, 3.35 TB/s,
50 MB of L2); the efficiency a GEMM or a Triton kernel reaches is not modelled.

The choice (:func:`plan_reduced`): the working-memory budget is 1/8 of eager's (3·N·V·l / 8;
``budget`` overrides it); each strategy takes the fewest equal blocks or chunks the budget
allows; a strategy that does not fit is out (for a 16-bit dW "rows" needs room for the
compensation: a plain 16-bit accumulator over many blocks is several times PyTorch's error);
of those that fit the smaller ``floor_s`` wins, ``serial_s`` breaking ties; if neither fits, the
one with the smaller working memory at its smallest block or chunk runs. At the two heads
(bf16; ``python -m unigen.kernels.fused_linear_cross_entropy.cost_model`` prints the table):

| head | way | TFLOP | HBM GB | working MB | floor ms | serial ms |
|---|---|---:|---:|---:|---:|---:|
| GPT-2, N = 20480, D = 768, V = 50257 | eager | 4.74 | 18.9 | 6176 | 5.63 | 8.48 |
| | **rows**, 4 blocks of 5120 | 4.74 | 14.4 | 609 | 4.80 | 6.66 |
| | vocab_chunks, 3 of 16768 | 6.32 | 8.2 | 753 | 6.39 | 6.63 |
| Llama-3, N = 8192, D = 4096, V = 128256 | eager | 25.82 | 22.3 | 6304 | 26.11 | 29.87 |
| | rows: does not fit (dW's compensation is 1.05 GB) | | | | | |
| | **vocab_chunks**, 4 of 32128 | 34.43 | 19.2 | 663 | 34.81 | 35.03 |

At the GPT-2 head the two estimates disagree by little: "rows" has the lower floor (6·N·D·V
FLOPs against 8), its serial estimate is 0.5 % above vocab_chunks' (its row kernel moves 6 GB
in a launch of its own). ``benchmarks/test_bench_cross_entropy.py`` times both
(``ours_rows``, ``ours_vocab_chunks``) so that a GPU run settles it. At the Llama-3 head only
vocab_chunks fits the bound, and its third more FLOPs put its floor above eager's: the price of
holding 1/8 of eager's memory (a row block that fits re-reads the 1 GB W and dW more than eager
moves in all).
"""

from __future__ import annotations

import dataclasses
import math

# Logit row strides of the materialised blocks are padded to this many elements: a row then
# starts on a 128-byte boundary (16-bit) and Triton's JIT sees a stride divisible by 16, so the
# row kernel's loads and stores are 16-byte vectors (V = 50257 made them scalar 2-byte accesses).
LOGITS_ROW_ALIGN = 64
# The fused kernels' row tile (BLOCK_N of their 16-bit and fp32 picks) and vocabulary tile.
FUSED_BLOCK_N = 128
FUSED_BLOCK_V = 128
# The share of L2 the H rows of one group of row blocks may hold (see group_rows).
GROUP_L2_BYTES = 16 * 2**20
MIN_ROW_BLOCK = 64  # rows strategy: GEMMs of fewer rows are mostly overhead


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    flops_16bit: float  # dense fp16/bf16 tensor-core FLOP/s
    flops_fp32: float  # fp32 FLOP/s without tensor cores (our fp32 paths use no TF32)
    bandwidth: float  # HBM bytes/s
    l2_bytes: float


H100_SXM = Device("H100 SXM (datasheet)", 989e12, 67e12, 3.35e12, 50e6)


@dataclasses.dataclass
class Phase:
    name: str
    flops: float
    bytes: float
    fp32: bool = False  # runs on fp32 units (fp32 inputs)

    def seconds(self, device: Device) -> float:
        peak = device.flops_fp32 if self.fp32 else device.flops_16bit
        return max(self.flops / peak, self.bytes / device.bandwidth)


@dataclasses.dataclass
class Estimate:
    """One way to run the call: its launches (phases), working memory and parameters."""

    strategy: str
    phases: list[Phase]
    working_bytes: float
    rows: int = 0  # rows per block (rows)
    chunk: int = 0  # vocabulary columns per chunk (vocab_chunks)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.phases)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.phases)

    def serial_s(self, device: Device = H100_SXM) -> float:
        return sum(p.seconds(device) for p in self.phases)

    def floor_s(self, device: Device = H100_SXM) -> float:
        fp32 = any(p.fp32 for p in self.phases)
        peak = device.flops_fp32 if fp32 else device.flops_16bit
        return max(self.flops / peak, self.bytes / device.bandwidth)


def padded_width(vocab: int) -> int:
    return -(-vocab // LOGITS_ROW_ALIGN) * LOGITS_ROW_ALIGN


def group_rows(dim: int, elem: int, block_n: int = FUSED_BLOCK_N) -> int:
    """Row blocks per group of the fused kernels' launch order: the largest power of two whose
    rows of H (group·block_n·D·e bytes) fit ``GROUP_L2_BYTES``, so a group's H stays in L2
    while the group streams W, which it then reads from HBM once (64 at D = 768, 16 at D = 4096,
    at most 64)."""
    fit = GROUP_L2_BYTES // max(1, block_n * dim * elem)
    return int(min(64, max(1, 2 ** int(math.log2(max(1, fit))))))


def eager(n, dim, vocab, elem, need_hidden=True, need_weight=True) -> Estimate:
    """``F.cross_entropy(F.linear(h, W), y)``, forward and backward, as eager PyTorch runs it."""
    z = n * vocab * elem
    fp32 = elem == 4
    phases = [Phase("linear", 2 * n * dim * vocab, n * dim * elem + vocab * dim * elem + z, fp32),
              Phase("log_softmax", 0, 2 * z), Phase("nll_loss_backward (zero-filled)", 0, z),
              Phase("log_softmax_backward", 0, 3 * z)]
    if need_hidden:
        phases.append(Phase("dH = G·W", 2 * n * dim * vocab,
                            z + vocab * dim * elem + n * dim * elem, fp32))
    if need_weight:
        phases.append(Phase("dW = Gᵀ·H", 2 * n * dim * vocab,
                            z + n * dim * elem + vocab * dim * elem, fp32))
    return Estimate("eager", phases, working_bytes=3 * z)


def rows_strategy(n, dim, vocab, elem, logits_elem, rows, need_hidden=True, need_weight=True,
                  need_bias=False) -> Estimate:
    rows = max(1, min(rows, n))
    blocks = -(-n // rows)
    width = padded_width(vocab)
    fp32 = elem == 4
    compensated = need_weight and elem == 2
    need_grad = need_hidden or need_weight or need_bias
    w = vocab * dim * elem
    phases = []
    for b in range(blocks):
        r = min(rows, n - b * rows)
        block = r * vocab * logits_elem
        h = r * dim * elem
        phases.append(Phase("gather H_b", 0, 2 * h))
        phases.append(Phase("logits GEMM", 2 * r * dim * vocab, w + h + block, fp32))
        # two passes over the row (max/Σexp, then dZ) and dZ written over it
        phases.append(Phase("row kernel", 0, (2 * block + r * vocab * elem) if need_grad else block))
        dz = r * vocab * elem
        if need_hidden:
            phases.append(Phase("dH_b GEMM + index_copy", 2 * r * dim * vocab, dz + w + 3 * h, fp32))
        if need_weight:
            # dZ and H_b read; dW's 16-bit sum and bf16 compensation (fp32 dW for fp32 inputs)
            # read and written: 8 bytes per element of dW either way
            phases.append(Phase("dW += dZᵀ·H_b", 2 * r * dim * vocab,
                                dz + h + 8 * vocab * dim, fp32))
        if need_bias:
            phases.append(Phase("db", 0, dz))
    working = rows * padded_width(vocab) * logits_elem + 2 * rows * dim * elem + 32 * n
    if compensated:
        working += 2 * vocab * dim
    del width
    return Estimate("rows", phases, working_bytes=working, rows=rows)


def forward_splits(n, vocab, block_n=FUSED_BLOCK_N, block_v=FUSED_BLOCK_V) -> int:
    """The vocabulary splits of ``_flce_forward_kernel`` (as ``triton_forward`` picks them)."""
    row_blocks = -(-n // block_n)
    splits = max(1, min(-(-vocab // block_v), -(-1024 // row_blocks)))
    per_split = -(-(-(-vocab // splits)) // block_v) * block_v
    return -(-vocab // per_split)


def vocab_chunks_strategy(n, dim, vocab, elem, chunk, need_hidden=True, need_weight=True,
                          need_bias=False) -> Estimate:
    chunk = max(FUSED_BLOCK_V, min(chunk, -(-vocab // FUSED_BLOCK_V) * FUSED_BLOCK_V))
    chunks = -(-vocab // chunk)
    fp32 = elem == 4
    need_grad = need_hidden or need_weight or need_bias
    w = vocab * dim * elem
    h = n * dim * elem
    w_sweeps = -(-(-(-n // FUSED_BLOCK_N)) // group_rows(dim, elem))
    splits = forward_splits(n, vocab)
    phases = [Phase("forward kernel (lse, loss)", 2 * n * dim * vocab,
                    w_sweeps * w + h + 4 * splits * n * 4, fp32)]
    if need_grad:
        phases.append(Phase("zero dZ", 0, n * chunk * elem))
    for c in range(chunks if need_grad else 0):
        width = min(chunk, vocab - c * chunk)
        dz = n * width * elem
        w_c = width * dim * elem
        phases.append(Phase("dZ kernel (logits recomputed)", 2 * n * dim * width,
                            w_sweeps * w_c + h + dz, fp32))
        if need_hidden:
            phases.append(Phase("dH += dZ·W_c (fp32)", 2 * n * dim * width,
                                dz + w_c + 2 * n * dim * 4, fp32))
        if need_weight:
            phases.append(Phase("dW_c = dZᵀ·H", 2 * n * dim * width, dz + h + w_c, fp32))
        if need_bias:
            phases.append(Phase("db_c", 0, dz))
    if need_hidden:
        phases.append(Phase("dH to the input dtype", 0, n * dim * (4 + elem)))
    working = (n * chunk * elem if need_grad else 0) + (4 * n * dim if need_hidden else 0)
    working += 4 * splits * n * 4 + 32 * n
    return Estimate("vocab_chunks", phases, working_bytes=working, chunk=chunk)


def _largest_fitting(budget, fixed, per_unit, unit, low, total):
    """How to cut ``total`` into equal pieces (multiples of ``unit``, at least ``low``) as few as
    the budget allows (fixed + per_unit·piece <= budget): the piece, or None when even ``low``
    does not fit."""
    x = (budget - fixed) // max(1, per_unit) // unit * unit
    if x < low:
        return None
    pieces = -(-total // max(x, 1))
    return int(max(low, -(-(-(-total // pieces)) // unit) * unit))


def plan_reduced(n, dim, vocab, elem, *, logits_elem=None, need_hidden=True, need_weight=True,
                 need_bias=False, budget=None, strategy=None, rows=None, min_rows=MIN_ROW_BLOCK,
                 device=H100_SXM) -> Estimate:
    """The strategy, block or chunk for one call (see the module docstring). ``strategy``,
    ``rows`` force a choice (tests, the benchmarks); ``budget`` replaces the 1/8-of-eager
    bound on working memory; ``min_rows`` is the smallest row block "rows" runs."""
    logits_elem = logits_elem or elem
    if budget is None:
        budget = eager(n, dim, vocab, logits_elem).working_bytes / 8
    flags = dict(need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
    compensation = 2 * vocab * dim if (need_weight and elem == 2) else 0
    candidates = []
    if strategy in (None, "rows"):
        r = rows or _largest_fitting(budget, compensation + 32 * n,
                                     padded_width(vocab) * logits_elem + 2 * dim * elem, 16,
                                     min(min_rows, n), n)
        if r is None and strategy == "rows":
            r = min(min_rows, n)  # forced: exceed the budget rather than run tiny GEMMs
        if r is not None:
            candidates.append(rows_strategy(n, dim, vocab, elem, logits_elem, r, **flags))
    if strategy in (None, "vocab_chunks"):
        fixed = (4 * n * dim if need_hidden else 0) + 16 * forward_splits(n, vocab) * n + 32 * n
        c = _largest_fitting(budget, fixed, n * elem, FUSED_BLOCK_V, FUSED_BLOCK_V, vocab)
        if c is None and strategy == "vocab_chunks":
            c = FUSED_BLOCK_V
        if c is not None:
            candidates.append(vocab_chunks_strategy(n, dim, vocab, elem, c, **flags))
    if not candidates:  # nothing fits: the smallest working memory
        candidates = [rows_strategy(n, dim, vocab, elem, logits_elem, min(min_rows, n),
                                    **flags),
                      vocab_chunks_strategy(n, dim, vocab, elem, FUSED_BLOCK_V, **flags)]
        return min(candidates, key=lambda e: e.working_bytes)
    return min(candidates, key=lambda e: (e.floor_s(device), e.serial_s(device)))


HEADS = {"GPT-2 head": (20480, 768, 50257), "Llama-3 head": (8192, 4096, 128256)}


def report(device=H100_SXM) -> str:
    """The model's numbers at the two heads (bf16): ours (each strategy and the choice) and eager."""
    lines = [f"{device.name}: {device.flops_16bit / 1e12:.0f} TFLOP/s bf16, "
             f"{device.bandwidth / 1e12:.2f} TB/s",
             "| head | way | TFLOP | HBM GB | working MB | floor ms | serial ms |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for head, (n, d, v) in HEADS.items():
        chosen = plan_reduced(n, d, v, 2)
        ways = [("eager PyTorch", eager(n, d, v, 2))]
        budget = eager(n, d, v, 2).working_bytes / 8
        for strategy in ("rows", "vocab_chunks"):
            est = plan_reduced(n, d, v, 2, strategy=strategy)
            mark = (" (chosen)" if est.strategy == chosen.strategy else
                    " (over the budget)" if est.working_bytes > budget else "")
            param = f"{est.rows} rows" if strategy == "rows" else f"{est.chunk} columns"
            ways.append((f"ours, {strategy}, {param}{mark}", est))
        for name, est in ways:
            lines.append(f"| {head} | {name} | {est.flops / 1e12:.2f} | {est.bytes / 1e9:.1f} | "
                         f"{est.working_bytes / 1e6:.0f} | {est.floor_s(device) * 1e3:.2f} | "
                         f"{est.serial_s(device) * 1e3:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
