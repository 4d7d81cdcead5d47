"""The FLOPs of one UniGen training step, part by part, counted from the config and the batch's
layout (nothing runs): what ``test_bench_train_step.py`` divides its step time by, and how much
of a step the frozen ViT is — the work a feature store (``data.image_features``) removes.

Counted: every matmul of the forward (2 FLOPs per multiply-add: a linear layer costs
``2 · in · out`` per token, attention ``4 · L² · d`` per layer and sequence for the scores and
the weighted sum, half of it where the attention is causal), then the backward by what needs
gradients:

* the frozen ViT runs forward only (no gradient reaches it): × 1;
* the frozen middle blocks of the decoder pass gradients to the blocks below: × 2 (forward and
  the input gradient, no weight gradient);
* every trainable part: × 3 (forward, input and weight gradients).

Not counted: embeddings, LayerNorms, activations, softmax, the loss reductions and the
optimizer (each linear in the tokens, small beside the matmuls). Run
``python -m benchmarks.step_flops`` for the paper-size step of the benchmark.
"""

from __future__ import annotations

import torch

from unigen.model.batch import UniGenBatch
from unigen.model.config import UniGenConfig


def _layer(width: int, ffn: int, tokens: float) -> float:
    """Forward matmul FLOPs of one transformer layer's projections and MLP on ``tokens``."""
    return 2.0 * (4 * width * width + 2 * width * ffn) * tokens


def _attention(width: int, length: float, causal: bool = False) -> float:
    return (2.0 if causal else 4.0) * length * length * width


def step_flops(cfg: UniGenConfig, batch: UniGenBatch) -> dict[str, float]:
    """FLOPs of one training step on ``batch`` per part (``vit``, ``qformer``,
    ``text_encoder``, ``decoder``, ``lm_head``, ``contrastive``) and ``total``; ``vit`` is what
    a run from a feature store does not compute."""
    v, q, t, d = cfg.vision, cfg.qformer, cfg.text, cfg.decoder
    # the rows the samples and pairs read (a batch may leave its pixels out for counting)
    rows = [batch.image_index, batch.pair_image_index] + (
        [batch.second_image_index] if batch.second_image_index is not None else [])
    n_img = batch.num_images or int(max(int(r.max()) if r.numel() else -1 for r in rows)) + 1
    vit_tokens = v.num_patches + 1
    Q = q.num_query_tokens

    vit = n_img * (2.0 * 3 * v.patch_size ** 2 * v.hidden_size * v.num_patches
                   + v.num_layers_used * (_layer(v.hidden_size, v.intermediate_size, vit_tokens)
                                          + _attention(v.hidden_size, vit_tokens)))

    cross = len(range(0, q.num_hidden_layers, q.cross_attention_freq))
    h = q.hidden_size
    qformer_fwd = n_img * (
        q.num_hidden_layers * (_layer(h, q.intermediate_size, Q) + _attention(h, Q))
        # cross-attention: queries and output on the Q queries, keys and values on every ViT token
        + cross * (2.0 * 2 * h * h * Q + 2.0 * 2 * v.hidden_size * h * vit_tokens
                   + 4.0 * Q * vit_tokens * h)
        + 2.0 * h * d.n_embd * Q)  # the projection to the decoder width

    lens = (batch.text_mask.sum(1).double() if batch.text_mask is not None
            else torch.zeros(0, dtype=torch.float64))
    text_fwd = float(sum(t.num_hidden_layers * (_layer(t.hidden_size, t.intermediate_size, n)
                                                + _attention(t.hidden_size, n))
                         for n in lens.tolist()))
    if t.hidden_size != d.n_embd:
        text_fwd += 2.0 * t.hidden_size * d.n_embd * float(lens.sum())

    # the decoder's sequences: each sample's prefix and target, and the [match] samples the
    # model builds from the pairs (a "yes" per pair, two mined "no" per pair)
    target_lens = (batch.target_cu_seqlens[1:] - batch.target_cu_seqlens[:-1]).double()
    has_text = batch.text_index >= 0
    text_of = torch.where(has_text, lens[batch.text_index.clamp(min=0)] if lens.numel() else 0.0,
                          torch.zeros(()).double())
    images_of = (batch.image_index >= 0).double() + (
        (batch.second_image_index >= 0).double() if batch.second_image_index is not None else 0.0)
    seqs = (images_of * Q + text_of + target_lens).tolist()
    predicted = float(target_lens.sum())
    P = batch.num_pairs
    if P and cfg.loss.beta > 0:
        yes = len(cfg.tasks.match_yes_ids) + 1
        no = len(cfg.tasks.match_no_ids) + 1
        pair_text = lens[batch.pair_text_index].tolist()
        seqs += [Q + n + yes for n in pair_text]
        predicted += P * yes
        if cfg.loss.match_negatives and P > 1:
            seqs += [Q + max(pair_text) + no] * P + [Q + n + no for n in pair_text]
            predicted += 2 * P * no
    D = d.n_embd
    block_fwd = sum(_layer(D, 4 * D, n) + _attention(D, n, causal=True) for n in seqs)
    frozen = len(d.frozen_blocks)
    decoder = block_fwd * (3 * (d.n_layer - frozen) + 2 * frozen)
    lm_head = 3 * 2.0 * D * (d.vocab_size + 4) * predicted
    contrastive = 3 * 2.0 * (h + t.hidden_size) * cfg.loss.contrastive_dim * P

    parts = {"vit": vit, "qformer": 3 * qformer_fwd, "text_encoder": 3 * text_fwd,
             "decoder": decoder, "lm_head": lm_head, "contrastive": contrastive}
    parts["total"] = sum(parts.values())
    return parts


def main() -> None:
    """The paper-size step of ``test_bench_train_step.py`` (64 samples, the paper's per-GPU
    batch): FLOPs per part, per sample, and the ViT's share."""
    from benchmarks.test_bench_train_step import SAMPLES_GPU, batch_for, config_for

    cfg = config_for("paper")
    flops = step_flops(cfg, batch_for(cfg, SAMPLES_GPU, images=False))
    total = flops["total"]
    print(f"paper-size step, {SAMPLES_GPU} samples: {total / 1e12:.2f} TFLOP, "
          f"{total / SAMPLES_GPU / 1e9:.1f} GFLOP per sample")
    for part, value in flops.items():
        if part != "total":
            print(f"  {part:<13} {value / 1e12:7.3f} TFLOP  {value / total:6.1%}")
    print(f"without the ViT (a feature store): {(total - flops['vit']) / SAMPLES_GPU / 1e9:.1f} "
          f"GFLOP per sample, {total / (total - flops['vit']):.2f}x less work")


if __name__ == "__main__":
    main()
