"""Batched generation from prefix embeddings with the GPT-2 decoder: greedy and beam search.

UniGen's decoder continues a prefix (encoder outputs ⊕ task-token embedding, paper §3.3), so
generation starts from embeddings, not token ids. A batch of prefixes of different lengths is
*left*-padded: every sample's last prefix token then sits in the same column, so each step feeds
one new token per row and reads one column of logits. Position ids count real tokens only (0 at
each sample's first real token), which makes a padded sample compute exactly what it computes
alone.

``generate`` keeps a KV cache (one new token per step through every layer);
``generate_without_cache`` recomputes the whole sequence every step through ``forward_padded``
(right-padded, a different code path) and exists to test the former. Both share the search
itself (:func:`_search`): greedy when ``num_beams == 1``, beam search otherwise.

Beam search follows the usual recipe: ``num_beams`` live beams per sample; each step takes the
``2 * num_beams`` best continuations, a continuation ending in ``eos`` (among the first
``num_beams``) becomes a finished hypothesis scored ``sum log p / length ** length_penalty``
(length counts the generated tokens, eos included), the others refill the beams. A sample stops
when it holds ``num_beams`` hypotheses and no live beam can still beat the worst of them; at
``max_new_tokens`` the live beams are finished as they are.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unigen.model.gpt2_decoder import GPT2Decoder

# ---------------------------------------------------------------------------------------------
# argument checks


def _check_prefixes(decoder, prefix_embeds, prefix_lens, *, op: str, extra_len: int = 0):
    if not isinstance(decoder, GPT2Decoder):
        raise TypeError(f"{op}: decoder must be a GPT2Decoder, got {type(decoder).__name__}")
    if not isinstance(prefix_embeds, (list, tuple)) or len(prefix_embeds) == 0:
        raise ValueError(f"{op}: prefix_embeds must be a non-empty list of [P_i, D] tensors")
    cfg = decoder.config
    device = decoder.wte.weight.device
    for i, p in enumerate(prefix_embeds):
        if not isinstance(p, torch.Tensor) or p.dim() != 2 or p.shape[1] != cfg.n_embd or p.shape[0] < 1:
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"{op}: prefix_embeds[{i}] must be a [P, {cfg.n_embd}] tensor with P >= 1, got {shape}"
            )
        if not p.is_floating_point():
            raise TypeError(f"{op}: prefix_embeds[{i}] must be floating point, got {p.dtype}")
        if p.device != device:
            raise ValueError(f"{op}: prefix_embeds[{i}] is on {p.device} but the decoder is on {device}")
        if p.shape[0] + extra_len > cfg.n_positions:
            raise ValueError(
                f"{op}: prefix_embeds[{i}] has {p.shape[0]} tokens; with {extra_len} more the "
                f"sequence exceeds n_positions={cfg.n_positions}"
            )
    if prefix_lens is None:
        # Default: every prefix embedding belongs to the (possibly bidirectional) prefix block.
        return [p.shape[0] for p in prefix_embeds]
    if len(prefix_lens) != len(prefix_embeds):
        raise ValueError(
            f"{op}: prefix_lens has {len(prefix_lens)} entries for {len(prefix_embeds)} prefixes"
        )
    for i, (n, p) in enumerate(zip(prefix_lens, prefix_embeds, strict=True)):
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= p.shape[0]:
            raise ValueError(f"{op}: prefix_lens[{i}] must be an int in [0, {p.shape[0]}], got {n!r}")
    return list(prefix_lens)


def _check_generate_args(decoder, max_new_tokens, eos_token_id, num_beams, length_penalty, *, op):
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"{op}: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(eos_token_id, int) or not 0 <= eos_token_id < decoder.vocab_size:
        raise ValueError(
            f"{op}: eos_token_id must be an int in [0, {decoder.vocab_size}), got {eos_token_id!r}"
        )
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"{op}: num_beams must be a positive int, got {num_beams!r}")
    if num_beams > 1 and decoder.vocab_size < 2:
        raise ValueError(f"{op}: beam search needs a vocabulary of at least 2 tokens")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"{op}: length_penalty must be a finite number, got {length_penalty!r}")


def _logits(decoder, hidden):
    """Next-token logits, in fp32 for the log-softmax and the beam scores. The product itself runs
    in the model's dtype: upcasting the [V, D] head every step would copy it each time."""
    return F.linear(hidden.to(decoder.lm_head_weight.dtype), decoder.lm_head_weight).float()


# ---------------------------------------------------------------------------------------------
# the two ways to run the decoder one step: with a KV cache, or recomputing everything
#
# A stepper holds the state of N = B * num_beams rows (row r belongs to sample r // num_beams).
# start() returns the logits [N, V] after the prefix; step(tokens [N], beam_index [N]) first makes
# row r continue row beam_index[r], appends tokens[r] to it and returns the next logits.


class _Stepper:
    def __init__(self, decoder, prefix_embeds, prefix_lens, num_beams):
        self.decoder = decoder
        self.prefix_embeds = prefix_embeds
        self.prefix_lens = prefix_lens
        self.k = num_beams


class _CachedStepper(_Stepper):
    def start(self):
        dec, k = self.decoder, self.k
        device = dec.wte.weight.device
        lengths = torch.tensor([p.shape[0] for p in self.prefix_embeds], device=device)
        B, P = len(self.prefix_embeds), int(lengths.max())
        embeds = self.prefix_embeds[0].new_zeros(B, P, dec.config.n_embd)
        for b, p in enumerate(self.prefix_embeds):
            embeds[b, P - p.shape[0] :] = p  # left padding
        mask = torch.arange(P, device=device)[None, :] >= (P - lengths)[:, None]
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        prefix_lens = torch.tensor(self.prefix_lens, device=device)
        hidden, cache = dec.forward_cached(embeds, positions, mask, None, prefix_lens=prefix_lens)
        # The prefix is run once per sample, then each sample's state is copied to its beams.
        rows = torch.arange(B, device=device).repeat_interleave(k)
        self.cache = cache.reorder(rows) if k > 1 else cache
        self.mask = mask[rows]
        self.next_position = lengths[rows]
        return _logits(dec, hidden[:, -1])[rows]

    def step(self, tokens, beam_index):
        dec = self.decoder
        if beam_index is not None:
            self.cache = self.cache.reorder(beam_index)
            self.mask, self.next_position = self.mask[beam_index], self.next_position[beam_index]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        embeds = dec.wte(tokens)[:, None, :].to(self.prefix_embeds[0].dtype)
        hidden, self.cache = dec.forward_cached(embeds, self.next_position[:, None], self.mask, self.cache)
        self.next_position = self.next_position + 1
        return _logits(dec, hidden[:, -1])


class _RecomputeStepper(_Stepper):
    def _forward(self):
        dec, k = self.decoder, self.k
        device = dec.wte.weight.device
        N = len(self.prefix_embeds) * k
        tokens = dec.wte(self.generated).to(self.prefix_embeds[0].dtype)  # [N, t, D]
        rows = [torch.cat([self.prefix_embeds[r // k], tokens[r]], dim=0) for r in range(N)]
        lengths = torch.tensor([x.shape[0] for x in rows], device=device)
        padded = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # right padding
        prefix_lens = torch.tensor([self.prefix_lens[r // k] for r in range(N)], device=device)
        hidden = dec.forward_padded(padded, lengths, prefix_lens)
        return _logits(dec, hidden[torch.arange(N, device=device), lengths - 1])

    def start(self):
        N = len(self.prefix_embeds) * self.k
        self.generated = torch.zeros(N, 0, dtype=torch.long, device=self.decoder.wte.weight.device)
        return self._forward()

    def step(self, tokens, beam_index):
        generated = self.generated if beam_index is None else self.generated[beam_index]
        self.generated = torch.cat([generated, tokens[:, None]], dim=1)
        return self._forward()


# ---------------------------------------------------------------------------------------------
# the search


def _greedy(stepper, B, max_new_tokens, eos):
    logits = stepper.start()
    steps = []
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    for t in range(max_new_tokens):
        # Finished rows keep being fed eos; what they produce afterwards is cut off below.
        tokens = logits.argmax(dim=-1).masked_fill(finished, eos)
        steps.append(tokens)
        finished |= tokens == eos
        if t == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = stepper.step(tokens, None)
    out = []
    for row in torch.stack(steps, dim=1).tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


def _beam_search(stepper, B, K, max_new_tokens, eos, length_penalty):
    logprobs = F.log_softmax(stepper.start(), dim=-1)
    N, V = logprobs.shape
    device = logprobs.device
    # All beams of a sample start identical; only beam 0 is live at first, so the first step's
    # top-K are K distinct tokens instead of K copies of the best one.
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0
    sequences = torch.zeros(N, 0, dtype=torch.long, device=device)
    hypotheses = [[] for _ in range(B)]  # per sample: (normalised score, token list), best first
    done = [False] * B

    def add_hypothesis(b, tokens, score, length):
        hypotheses[b].append((score / length**length_penalty, tokens))
        hypotheses[b].sort(key=lambda h: h[0], reverse=True)
        del hypotheses[b][K:]

    for t in range(max_new_tokens):
        candidates = (scores.view(N, 1) + logprobs).view(B, K * V)
        # 2K candidates guarantee K non-eos ones: each beam contributes at most one eos.
        top_scores, top_ids = candidates.topk(2 * K, dim=1)
        top_scores, top_ids = top_scores.tolist(), top_ids.tolist()
        seq_rows = sequences.tolist()
        new_scores, new_source, new_tokens = [], [], []
        for b in range(B):
            if done[b]:
                # Keep the rows busy with something harmless; their results are never read.
                new_scores += [0.0] * K
                new_source += [b * K + j for j in range(K)]
                new_tokens += [eos] * K
                continue
            live = 0
            for rank, (score, idx) in enumerate(zip(top_scores[b], top_ids[b], strict=True)):
                source, token = b * K + idx // V, idx % V
                if token == eos:
                    # Only an eos the beam set itself would have taken; -inf comes from the
                    # not-yet-live beams of the first steps (more beams than continuations).
                    if rank < K and score > float("-inf"):
                        add_hypothesis(b, seq_rows[source], score, t + 1)
                    continue
                new_scores.append(score)
                new_source.append(source)
                new_tokens.append(token)
                live += 1
                if live == K:
                    break
            best_live = max(new_scores[-K:])
            if len(hypotheses[b]) == K:
                # Sums of log-probs only fall; with a positive length penalty the normalised score
                # is highest at the longest length, with a non-positive one at the shortest.
                length = max_new_tokens if length_penalty > 0 else t + 1
                done[b] = best_live / length**length_penalty <= hypotheses[b][-1][0]

        scores = torch.tensor(new_scores, device=device).view(B, K)
        beam_index = torch.tensor(new_source, device=device)
        tokens = torch.tensor(new_tokens, device=device)
        sequences = torch.cat([sequences[beam_index], tokens[:, None]], dim=1)
        if all(done) or t == max_new_tokens - 1:
            break
        logprobs = F.log_softmax(stepper.step(tokens, beam_index), dim=-1)

    # Samples still searching at the length limit finish their live beams as they are.
    seq_rows, score_rows = sequences.tolist(), scores.tolist()
    for b in range(B):
        if not done[b]:
            for j in range(K):
                add_hypothesis(b, seq_rows[b * K + j], score_rows[b][j], len(seq_rows[b * K + j]))
    return [hypotheses[b][0][1] for b in range(B)]


def _search(
    stepper_cls,
    decoder,
    prefix_embeds,
    *,
    max_new_tokens,
    eos_token_id,
    num_beams,
    length_penalty,
    prefix_lens,
    op,
):
    _check_generate_args(decoder, max_new_tokens, eos_token_id, num_beams, length_penalty, op=op)
    # The last generated token is never fed back: max_new_tokens - 1 positions follow the prefix.
    prefix_lens = _check_prefixes(decoder, prefix_embeds, prefix_lens, op=op, extra_len=max_new_tokens - 1)
    stepper = stepper_cls(decoder, list(prefix_embeds), prefix_lens, num_beams)
    if num_beams == 1:
        return _greedy(stepper, len(prefix_embeds), max_new_tokens, eos_token_id)
    return _beam_search(
        stepper, len(prefix_embeds), num_beams, max_new_tokens, eos_token_id, float(length_penalty)
    )


# ---------------------------------------------------------------------------------------------
# public API


@torch.no_grad()
def generate(
    decoder, prefix_embeds, *, max_new_tokens, eos_token_id, num_beams=1, length_penalty=1.0, prefix_lens=None
):
    """Continue each prefix with up to ``max_new_tokens`` tokens.

    decoder: a :class:`GPT2Decoder` (call ``.eval()`` first if it has dropout).
    prefix_embeds: list of ``[P_i, D]`` tensors (encoder outputs ⊕ task-token embedding).
    prefix_lens: per sample, how many leading prefix embeddings form the bidirectional block when
    the decoder's ``prefix_attention == "bidirectional"``; default all of them. Ignored when
    causal. num_beams 1 is greedy decoding, more is beam search with ``length_penalty``.
    Returns per sample the generated token ids, without the eos token.
    """
    return _search(
        _CachedStepper,
        decoder,
        prefix_embeds,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        num_beams=num_beams,
        length_penalty=length_penalty,
        prefix_lens=prefix_lens,
        op="generate",
    )


@torch.no_grad()
def generate_without_cache(
    decoder, prefix_embeds, *, max_new_tokens, eos_token_id, num_beams=1, length_penalty=1.0, prefix_lens=None
):
    """:func:`generate` recomputing the full sequence every step (no KV cache): slow, for tests."""
    return _search(
        _RecomputeStepper,
        decoder,
        prefix_embeds,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_token_id,
        num_beams=num_beams,
        length_penalty=length_penalty,
        prefix_lens=prefix_lens,
        op="generate_without_cache",
    )


def sequence_logprob(decoder, prefix_embeds, target_ids, *, prefix_lens=None):
    """Per-sample ``sum_t log p(target_t | prefix, target_<t)``, a float32 tensor ``[B]``.

    target_ids: per sample a non-empty list (or 1-D tensor) of token ids. Used to score fixed
    answers ([match] "yes"/"no", QA candidates). Differentiable: wrap in ``torch.no_grad()`` to
    score only. Runs one right-padded forward (``forward_padded``).
    """
    op = "sequence_logprob"
    if not isinstance(target_ids, (list, tuple)) or len(target_ids) != len(prefix_embeds):
        raise ValueError(f"{op}: target_ids must be a list with one entry per prefix ({len(prefix_embeds)})")
    prefix_lens = _check_prefixes(decoder, prefix_embeds, prefix_lens, op=op)
    device = decoder.wte.weight.device
    targets = []
    for i, ids in enumerate(target_ids):
        ids = torch.as_tensor(ids, device=device)
        if ids.dim() != 1 or ids.numel() == 0 or ids.is_floating_point():
            raise ValueError(f"{op}: target_ids[{i}] must be a non-empty 1-D sequence of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= decoder.vocab_size:
            raise ValueError(f"{op}: target_ids[{i}] has ids outside [0, {decoder.vocab_size})")
        if prefix_embeds[i].shape[0] + ids.numel() - 1 > decoder.config.n_positions:
            raise ValueError(
                f"{op}: prefix + target of sample {i} exceed n_positions={decoder.config.n_positions}"
            )
        targets.append(ids.long())

    # The last target token is only predicted, never fed.
    rows = [
        torch.cat([p, decoder.wte(t[:-1]).to(p.dtype)], dim=0)
        for p, t in zip(prefix_embeds, targets, strict=True)
    ]
    lengths = torch.tensor([r.shape[0] for r in rows], device=device)
    hidden = decoder.forward_padded(
        torch.nn.utils.rnn.pad_sequence(rows, batch_first=True),
        lengths,
        torch.tensor(prefix_lens, device=device),
    )
    # Target token j of sample b is predicted by the hidden state one position before it.
    sample = torch.cat([torch.full((t.numel(),), b, device=device) for b, t in enumerate(targets)])
    position = torch.cat(
        [
            torch.arange(t.numel(), device=device) + p.shape[0] - 1
            for p, t in zip(prefix_embeds, targets, strict=True)
        ]
    )
    logprobs = F.log_softmax(_logits(decoder, hidden[sample, position]), dim=-1)
    token_logprob = logprobs.gather(1, torch.cat(targets)[:, None]).squeeze(1)
    return torch.zeros(len(targets), device=device).index_add(0, sample, token_logprob)
