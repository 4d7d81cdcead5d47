"""Generation: KV cache == recomputation, batched == one by one, beam search == exhaustive search
on a tiny vocabulary, greedy and beam search == transformers, sequence_logprob, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from unigen.model.generation import generate, generate_without_cache, sequence_logprob
from unigen.model.gpt2_decoder import DecoderConfig, GPT2Decoder

D = 64


def tiny(**overrides):
    torch.manual_seed(0)
    model = GPT2Decoder(DecoderConfig.tiny(**overrides)).eval()
    # A freshly initialised GPT-2 predicts nearly uniform distributions (near-ties everywhere).
    # Larger token embeddings give peaked logits (the head is tied), and larger position
    # embeddings make them change from step to step instead of repeating one token, so greedy
    # and beam search produce varied, different outputs, like a trained model.
    with torch.no_grad():
        model.wte.weight.mul_(5.0)
        model.wpe.weight.mul_(25.0)
    return model


def prefixes(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for n in sizes]


def generate_with_early_eos(model, xs, **kwargs):
    """Pick as eos a token the model produces, such that some sample stops before the limit
    (so the tests cover finished samples next to running ones). Returns (eos, outputs)."""
    first = generate(model, xs, eos_token_id=0, **kwargs)
    for token in dict.fromkeys(t for out in first for t in out):
        outputs = generate(model, xs, eos_token_id=token, **kwargs)
        if any(len(out) < kwargs["max_new_tokens"] for out in outputs):
            return token, outputs
    raise AssertionError("no produced token stops a sample early")


@pytest.mark.parametrize("prefix_attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_cache_equals_recompute_and_batched_equals_single(prefix_attention, num_beams):
    model = tiny(prefix_attention=prefix_attention)
    xs = prefixes([5, 1, 8, 3])
    prefix_lens = [4, 1, 8, 0]
    kwargs = dict(max_new_tokens=8, num_beams=num_beams, prefix_lens=prefix_lens)
    eos, cached = generate_with_early_eos(model, xs, **kwargs)
    assert cached == generate_without_cache(model, xs, eos_token_id=eos, **kwargs)
    assert all(eos not in out for out in cached)
    one_by_one = [
        generate(model, [x], eos_token_id=eos, max_new_tokens=8, num_beams=num_beams, prefix_lens=[p])[0]
        for x, p in zip(xs, prefix_lens, strict=True)
    ]
    assert cached == one_by_one


def _exhaustive_best(model, prefix, eos, max_new_tokens, length_penalty):
    """Best hypothesis over every possible output: eos-terminated ones of every length, and the
    unterminated ones at the length limit, scored as beam search scores them."""
    V = model.vocab_size
    others = [t for t in range(V) if t != eos]
    candidates = [
        list(seq) + [eos] for n in range(max_new_tokens) for seq in itertools.product(others, repeat=n)
    ]
    candidates += [list(seq) for seq in itertools.product(others, repeat=max_new_tokens)]
    with torch.no_grad():
        logp = sequence_logprob(model, [prefix] * len(candidates), candidates)
    scores = logp / torch.tensor([float(len(c)) for c in candidates]) ** length_penalty
    best = candidates[int(scores.argmax())]
    return best[:-1] if best and best[-1] == eos else best


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_search_is_exhaustive(length_penalty):
    # With as many beams as there are continuations, beam search keeps every hypothesis and must
    # return the best-scoring one of all (V=5, 3 tokens: 125 beams).
    model = tiny(vocab_size=5)
    eos, steps = 1, 3
    xs = prefixes([3, 6], seed=3)
    beams = generate(
        model, xs, max_new_tokens=steps, eos_token_id=eos, num_beams=125, length_penalty=length_penalty
    )
    expected = [_exhaustive_best(model, x, eos, steps, length_penalty) for x in xs]
    assert beams == expected


def _transformers_copy(model):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=512,
        n_positions=128,
        n_embd=D,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    # Our nn.Linear weights are [out, in]; GPT-2's Conv1D holds [in, out].
    state = {
        k: (v.t() if k.startswith("h.") and k.endswith(".weight") and v.dim() == 2 else v)
        for k, v in model.state_dict().items()
    }
    hf.transformer.load_state_dict(state)
    hf.tie_weights()
    assert torch.equal(hf.lm_head.weight, model.wte.weight)
    return hf


def _transformers_generate(hf, x, eos, **kwargs):
    with torch.no_grad():
        out = hf.generate(
            inputs_embeds=x[None],
            attention_mask=torch.ones(1, x.shape[0], dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
            **kwargs,
        )
    out = out[0].tolist()  # with inputs_embeds only, transformers returns the new tokens only
    return out[: out.index(eos)] if eos in out else out


def test_greedy_matches_transformers():
    model = tiny()
    hf = _transformers_copy(model)
    for x in prefixes([6, 3], seed=5):
        for eos in (0, 175):
            ours = generate(model, [x], max_new_tokens=10, eos_token_id=eos)[0]
            assert ours == _transformers_generate(hf, x, eos, num_beams=1)


def test_beam_search_matches_transformers():
    # transformers' early_stopping="never" is the exact stopping rule we use (its default,
    # False, is a heuristic that may stop before a better hypothesis is found).
    model = tiny()
    hf = _transformers_copy(model)
    for x in prefixes([6, 4], seed=5):
        for eos, length_penalty in [(34, 2.0), (109, 1.0), (365, 0.0), (92, -1.0)]:
            ours = generate(
                model, [x], max_new_tokens=10, eos_token_id=eos, num_beams=3, length_penalty=length_penalty
            )[0]
            theirs = _transformers_generate(
                hf, x, eos, num_beams=3, length_penalty=length_penalty, early_stopping="never"
            )
            assert ours == theirs


def test_sequence_logprob_matches_manual_and_is_batched():
    model = tiny(prefix_attention="bidirectional")
    xs = prefixes([4, 2])
    targets = [[5, 9, 7], [3]]
    got = sequence_logprob(model, xs, targets, prefix_lens=[3, 2])
    for b, (x, target, p) in enumerate(zip(xs, targets, [3, 2], strict=True)):
        seq = torch.cat([x, model.wte(torch.tensor(target))])
        hidden = model.forward_padded(seq[None], torch.tensor([len(seq)]), torch.tensor([p]))[0]
        logp = F.log_softmax(hidden @ model.wte.weight.T, dim=-1)
        manual = sum(logp[x.shape[0] - 1 + j, t] for j, t in enumerate(target))
        torch.testing.assert_close(got[b], manual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            sequence_logprob(model, [x], [target], prefix_lens=[p])[0], manual, rtol=1e-5, atol=1e-5
        )
    got.sum().backward()  # differentiable, for training on fixed answers
    assert model.wte.weight.grad is not None


def test_bad_input():
    model = tiny()
    x = prefixes([3])
    with pytest.raises(ValueError, match="prefix_embeds"):
        generate(model, [], max_new_tokens=2, eos_token_id=0)
    with pytest.raises(ValueError, match=r"prefix_embeds\[0\]"):
        generate(model, [torch.randn(3, D + 1)], max_new_tokens=2, eos_token_id=0)
    with pytest.raises(ValueError, match="n_positions"):
        generate(model, x, max_new_tokens=127, eos_token_id=0)  # 3 + 126 fed positions > 128
    assert len(generate(model, x, max_new_tokens=126, eos_token_id=511)[0]) <= 126  # fits exactly
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, x, max_new_tokens=0, eos_token_id=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, x, max_new_tokens=2, eos_token_id=512)
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, x, max_new_tokens=2, eos_token_id=0, num_beams=0)
    with pytest.raises(ValueError, match=r"prefix_lens\[0\]"):
        generate(model, x, max_new_tokens=2, eos_token_id=0, prefix_lens=[4])
    with pytest.raises(ValueError, match="target_ids"):
        sequence_logprob(model, x, [[]])
    with pytest.raises(ValueError, match="target_ids"):
        sequence_logprob(model, x, [[600]])


@pytest.mark.gpu
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_on_cuda(num_beams):
    model = tiny(prefix_attention="bidirectional").cuda()
    xs = [x.cuda() for x in prefixes([5, 1, 8])]
    kwargs = dict(max_new_tokens=8, eos_token_id=34, num_beams=num_beams, prefix_lens=[4, 1, 8])
    cached = generate(model, xs, **kwargs)
    assert cached == generate_without_cache(model, xs, **kwargs)
    assert cached == [
        generate(model, [x], **{**kwargs, "prefix_lens": [p]})[0] for x, p in zip(xs, [4, 1, 8], strict=True)
    ]
