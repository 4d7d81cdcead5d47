"""GPT-2 decoder: parity with transformers, packed == padded == cached, freezing, vocab growth,
bad input. Tiny configs, fp32, CPU."""

import json

import pytest
import torch

from unigen.model.gpt2_decoder import DecoderConfig, GPT2Decoder, KVCache
from unigen.model.packing import pack

D = 64


def tiny(**overrides):
    torch.manual_seed(0)
    return GPT2Decoder(DecoderConfig.tiny(**overrides)).eval()


def random_samples(lengths, prefix_lens, dim=D, requires_grad=False):
    xs = [torch.randn(n, dim) for n in lengths]
    if requires_grad:
        for x in xs:
            x.requires_grad_(True)
    return xs, list(prefix_lens)


def padded_forward(model, xs, prefix_lens):
    lengths = torch.tensor([x.shape[0] for x in xs])
    padded = torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)
    return model.forward_padded(padded, lengths, torch.tensor(prefix_lens)), lengths


# ---------------------------------------------------------------------------------------------
# parity with Hugging Face transformers


def _hf_gpt2(tmp_path, *, lm_head: bool, bin_format: bool):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=512,
        n_positions=128,
        n_embd=D,
        n_layer=4,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(1)
    hf = (transformers.GPT2LMHeadModel if lm_head else transformers.GPT2Model)(cfg).eval()
    # Random init leaves biases and LayerNorm at 0/1; perturb them so a mis-loaded tensor shows.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    if bin_format:
        # The layout of older checkpoints: pytorch_model.bin, with the causal-mask buffers.
        state = dict(hf.state_dict())
        prefix = "transformer." if lm_head else ""
        for i in range(cfg.n_layer):
            state[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128, dtype=torch.bool))
        tmp_path.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp_path / "pytorch_model.bin")
        cfg.to_json_file(tmp_path / "config.json")
    else:
        hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("lm_head,bin_format", [(True, False), (False, True)])
def test_matches_transformers_gpt2(tmp_path, lm_head, bin_format):
    hf = _hf_gpt2(tmp_path, lm_head=lm_head, bin_format=bin_format)
    # frozen_layers left None: the middle half of this checkpoint's 4 blocks
    ours = GPT2Decoder.from_pretrained_gpt2(tmp_path).eval()
    assert ours.config.n_layer == 4 and ours.vocab_size == 512 and ours.config.frozen_blocks == (1, 2)
    ours.freeze_configured_layers()
    assert [b.ln_1.weight.requires_grad for b in ours.h] == [True, False, False, True]
    body = hf.transformer if lm_head else hf

    lengths = torch.tensor([7, 3, 1, 5])
    x = torch.randn(4, 7, D)
    valid = torch.arange(7)[None, :] < lengths[:, None]
    with torch.no_grad():
        expected = body(inputs_embeds=x, attention_mask=valid.long()).last_hidden_state
        got = ours.forward_padded(x, lengths, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert got[~valid].abs().max() == 0

    if lm_head:  # the tied head gives transformers' logits
        with torch.no_grad():
            logits = hf(inputs_embeds=x[:1]).logits
        torch.testing.assert_close(got[:1] @ ours.lm_head_weight.T, logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# packed == padded, values and gradients


def _packed_vs_padded(model, lengths, prefix_lens):
    xs, prefix_lens = random_samples(lengths, prefix_lens, requires_grad=True)
    batch = pack(xs, prefix_lens)
    out_packed = model.forward_packed(
        batch.values, batch.cu_seqlens, batch.prefix_lens, batch.position_ids, batch.max_seqlen
    )
    weights = torch.randn_like(out_packed)
    # wte is not used: the inputs are embeddings already.
    params = [p for name, p in model.named_parameters() if name != "wte.weight"]
    grads_packed = torch.autograd.grad((out_packed * weights).sum(), xs + params)

    out_padded, lens = padded_forward(model, xs, prefix_lens)
    valid = torch.arange(out_padded.shape[1])[None, :] < lens[:, None]
    out_padded = out_padded[valid]  # row-major over (sample, position) == the packed order
    grads_padded = torch.autograd.grad((out_padded * weights).sum(), xs + params)

    torch.testing.assert_close(out_packed, out_padded, rtol=1e-5, atol=1e-5)
    for g_packed, g_padded in zip(grads_packed, grads_padded, strict=True):
        torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-5)
    return out_packed


@pytest.mark.parametrize("prefix_attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("backend", ["torch", "auto", "padded_sdpa"])
def test_packed_equals_padded(backend, prefix_attention):
    model = tiny(attention_backend=backend, prefix_attention=prefix_attention)
    # 1-token samples, an all-prefix sample, a prefix-free one.
    _packed_vs_padded(model, lengths=[9, 1, 4, 13, 1, 6], prefix_lens=[4, 1, 4, 0, 0, 3])


def test_packed_triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = dict(n_embd=32, n_head=2, n_layer=1, frozen_layers=(), vocab_size=16)
    for mode in ("causal", "bidirectional"):
        model = tiny(attention_backend="triton", prefix_attention=mode, **cfg)
        torch.manual_seed(2)
        xs = [torch.randn(n, 32, requires_grad=True) for n in (3, 1, 5)]
        batch = pack(xs, [2, 1, 0])
        out = model.forward_packed(batch.values, batch.cu_seqlens, batch.prefix_lens, batch.position_ids, 5)
        grads = torch.autograd.grad(out.sum(), xs)
        expected, lengths = padded_forward(model, xs, [2, 1, 0])
        valid = torch.arange(5)[None, :] < lengths[:, None]
        expected_grads = torch.autograd.grad(expected.sum(), xs)
        torch.testing.assert_close(out, expected[valid], rtol=1e-4, atol=1e-4)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_prefix_modes_differ_where_they_should():
    xs, _ = random_samples([6], [0])
    x = xs[0][None]
    lengths = torch.tensor([6])
    changed = x.clone()
    changed[0, 2] += torch.randn(
        D
    )  # perturb the third prefix token (not by a constant: LayerNorm removes it)
    for mode in ("causal", "bidirectional"):
        model = tiny(prefix_attention=mode)
        with torch.no_grad():
            a = model.forward_padded(x, lengths, torch.tensor([4]))
            b = model.forward_padded(changed, lengths, torch.tensor([4]))
            c = model.forward_padded(x, lengths, torch.tensor([1]))
        # Earlier prefix tokens see the later one only in the bidirectional mode.
        earlier_changed = not torch.allclose(a[0, :2], b[0, :2])
        assert earlier_changed == (mode == "bidirectional")
        # The causal decoder ignores prefix_lens; the bidirectional one does not.
        assert torch.equal(a, c) == (mode == "causal")
        # Nothing after the prefix leaks back into it.
        later = x.clone()
        later[0, 5] += torch.randn(D)
        with torch.no_grad():
            d = model.forward_padded(later, lengths, torch.tensor([4]))
        torch.testing.assert_close(a[0, :5], d[0, :5])


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("prefix_attention", ["causal", "bidirectional"])
def test_forward_cached_step_by_step_equals_full(prefix_attention):
    model = tiny(prefix_attention=prefix_attention)
    prefix_sizes, prefix_lens, n_new = [5, 2, 3], [3, 2, 0], 4
    samples = [torch.randn(p + n_new, D) for p in prefix_sizes]
    full, _ = padded_forward(model, samples, prefix_lens)

    # Left-padded prefixes in one call, then one new token per call.
    P = max(prefix_sizes)
    embeds = torch.zeros(3, P, D)
    mask = torch.zeros(3, P, dtype=torch.bool)
    for b, p in enumerate(prefix_sizes):
        embeds[b, P - p :] = samples[b][:p]
        mask[b, P - p :] = True
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden, cache = model.forward_cached(
            embeds, positions, mask, None, prefix_lens=torch.tensor(prefix_lens)
        )
        for b, p in enumerate(prefix_sizes):
            torch.testing.assert_close(hidden[b, P - p :], full[b, :p], rtol=1e-5, atol=1e-5)
        assert isinstance(cache, KVCache) and cache.seq_len == P
        next_pos = torch.tensor(prefix_sizes)
        for t in range(n_new):
            new = torch.stack([samples[b][p + t] for b, p in enumerate(prefix_sizes)])[:, None]
            mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
            hidden, cache = model.forward_cached(new, (next_pos + t)[:, None], mask, cache)
            expected = torch.stack([full[b, p + t] for b, p in enumerate(prefix_sizes)])
            torch.testing.assert_close(hidden[:, 0], expected, rtol=1e-5, atol=1e-5)
        assert cache.seq_len == P + n_new


def test_forward_cached_several_tokens_per_call():
    model = tiny()
    x = torch.randn(2, 7, D)
    full = model.forward_padded(x, torch.tensor([7, 7]), torch.zeros(2, dtype=torch.long))
    pos = torch.arange(7).expand(2, 7)
    ones = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        h1, cache = model.forward_cached(x[:, :3], pos[:, :3], ones[:, :3])
        h2, _ = model.forward_cached(x[:, 3:], pos[:, 3:], ones, cache)
    torch.testing.assert_close(torch.cat([h1, h2], dim=1), full, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# freezing and vocabulary growth


def test_freeze_configured_layers():
    model = tiny()
    assert all(p.requires_grad for p in model.parameters())
    model.freeze_configured_layers()
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    expected = {f"h.{i}.{name}" for i in (1, 2) for name, _ in model.h[i].named_parameters()}
    assert frozen == expected
    # Paper default: the middle 6 of 12.
    assert DecoderConfig().frozen_layers is None and DecoderConfig().frozen_blocks == (3, 4, 5, 6, 7, 8)


def test_add_tokens_grows_the_tied_head():
    model = tiny()
    old = model.wte.weight.detach().clone()
    model.add_tokens(4)
    assert model.vocab_size == 516 and model.config.vocab_size == 512
    assert model.lm_head_weight is model.wte.weight
    torch.testing.assert_close(model.wte.weight[:512], old)
    new = model.wte.weight[512:]
    assert (new - old.mean(0)).abs().max() < 0.2 and len({tuple(r.tolist()) for r in new}) == 4
    # The new rows get gradients both as inputs and through the head.
    out = model.forward_padded(model.wte(torch.tensor([[513, 1]])), torch.tensor([2]), torch.tensor([0]))
    (out @ model.lm_head_weight.T)[0, :, 514].sum().backward()
    assert model.wte.weight.grad[513].abs().sum() > 0 and model.wte.weight.grad[514].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(n_embd=65), "n_embd"),
        (dict(prefix_attention="sideways"), "prefix_attention"),
        (dict(attention_backend="cuda_magic"), "attention_backend"),
        (dict(frozen_layers=(0, 9)), "frozen_layers"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        DecoderConfig.tiny(**overrides)


def test_bad_forward_input():
    model = tiny()
    batch = pack([torch.randn(3, D), torch.randn(2, D)], [1, 0])
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.forward_packed(batch.values[:, :32], batch.cu_seqlens, batch.prefix_lens, batch.position_ids, 3)
    with pytest.raises(ValueError, match="prefix_lens"):
        model.forward_packed(batch.values, batch.cu_seqlens, batch.prefix_lens[:1], batch.position_ids, 3)
    with pytest.raises(ValueError, match="max_seqlen"):
        model.forward_packed(batch.values, batch.cu_seqlens, batch.prefix_lens, batch.position_ids, 1000)
    with pytest.raises(ValueError, match="lengths"):
        model.forward_padded(torch.randn(2, 4, D), torch.tensor([4, 5]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prefix_lens"):
        model.forward_padded(torch.randn(2, 4, D), torch.tensor([4, 2]), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="attention_mask"):
        model.forward_cached(torch.randn(1, 2, D), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2))
    with pytest.raises(ValueError, match="attention_mask"):
        model.forward_cached(
            torch.randn(1, 2, D), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool)
        )
    bidirectional = tiny(prefix_attention="bidirectional")
    with pytest.raises(ValueError, match="prefix_lens is required"):
        bidirectional.forward_cached(
            torch.randn(1, 2, D), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
        )
    # A bidirectional prefix split across calls cannot be cached correctly: refused.
    ones = torch.ones(1, 4, dtype=torch.bool)
    _, cache = bidirectional.forward_cached(
        torch.randn(1, 2, D), torch.arange(2)[None], ones[:, :2], prefix_lens=torch.tensor([3])
    )
    with pytest.raises(ValueError, match="passed whole"):
        bidirectional.forward_cached(
            torch.randn(1, 2, D), torch.arange(2, 4)[None], ones, cache, prefix_lens=torch.tensor([3])
        )


def test_bad_state_dict(tmp_path):
    model = tiny()
    source = GPT2Decoder(model.config).state_dict()
    hf_style = {
        k: (v.t() if k.startswith("h.") and k.endswith(".weight") and v.dim() == 2 else v)
        for k, v in source.items()
    }
    model.load_hf_gpt2_state_dict(dict(hf_style))  # the round trip itself loads
    torch.testing.assert_close(model.h[0].attn.c_attn.weight, source["h.0.attn.c_attn.weight"])

    missing = dict(hf_style)
    del missing["h.2.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing keys: \['h.2.mlp.c_fc.bias'\]"):
        model.load_hf_gpt2_state_dict(missing)
    extra = {**hf_style, "transformer.h.0.crossattention.c_attn.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys: .*crossattention"):
        model.load_hf_gpt2_state_dict(extra)
    wrong = {**hf_style, "wpe.weight": torch.zeros(64, D)}
    with pytest.raises(ValueError, match="wpe.weight has shape"):
        model.load_hf_gpt2_state_dict(wrong)
    untied = {**hf_style, "lm_head.weight": torch.zeros(512, D)}
    with pytest.raises(ValueError, match="tied"):
        model.load_hf_gpt2_state_dict(untied)

    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT2Decoder.from_pretrained_gpt2(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(dict(vocab_size=512, n_positions=128, n_embd=D, n_layer=4, n_head=4))
    )
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        GPT2Decoder.from_pretrained_gpt2(tmp_path, frozen_layers=(1, 2))
    torch.save(hf_style, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="unknown config overrides"):
        GPT2Decoder.from_pretrained_gpt2(tmp_path, frozen_layer=(1,))
    with pytest.raises(ValueError, match="frozen_layers"):  # GPT-2 base's blocks 3..8 of 4
        GPT2Decoder.from_pretrained_gpt2(tmp_path, frozen_layers=(3, 4, 5, 6, 7, 8))
    assert GPT2Decoder.from_pretrained_gpt2(tmp_path).config.frozen_blocks == (1, 2)  # derived
    loaded = GPT2Decoder.from_pretrained_gpt2(
        tmp_path, frozen_layers=(1, 2), prefix_attention="bidirectional"
    )
    assert loaded.config.prefix_attention == "bidirectional"
    torch.testing.assert_close(loaded.h[3].mlp.c_proj.weight, source["h.3.mlp.c_proj.weight"])
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(vocab_size=512, n_positions=128, n_embd=D, n_layer=4, n_head=4, activation_function="relu")
        )
    )
    with pytest.raises(ValueError, match="activation_function"):
        GPT2Decoder.from_pretrained_gpt2(tmp_path)


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_on_cuda_matches_padded(dtype):
    # The accuracy rule of flash-attention's tests: the packed (Triton) path's error against an
    # fp32 reference is at most about twice that of the padded path in the same dtype.
    reference = tiny(prefix_attention="bidirectional").cuda()
    model = tiny(prefix_attention="bidirectional", attention_backend="auto").cuda().to(dtype)
    lengths, prefix_lens = [37, 1, 80, 5], [33, 1, 40, 0]
    xs = [torch.randn(n, D, device="cuda") for n in lengths]
    expected, lens = padded_forward(reference, xs, prefix_lens)
    valid = torch.arange(expected.shape[1], device="cuda")[None, :] < lens.cuda()[:, None]
    expected = expected[valid]

    low = [x.to(dtype) for x in xs]
    batch = pack(low, prefix_lens)
    out = model(batch.values, batch.cu_seqlens, batch.prefix_lens, batch.position_ids, batch.max_seqlen)
    padded, _ = padded_forward(model, low, prefix_lens)
    err_packed = (out.float() - expected).abs().max().item()
    err_padded = (padded[valid].float() - expected).abs().max().item()
    assert err_packed <= 2 * err_padded + 2e-3, (err_packed, err_padded)
