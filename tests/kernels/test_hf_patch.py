"""patch_hf_model: a patched transformers causal LM trains on the fused cross-entropy with the same
loss and gradients as transformers' own ForCausalLMLoss, and is otherwise unchanged.

Tiny random models built from configs (nothing downloads), one per supported family, CPU.
"""

import copy
import ctypes
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unigen.kernels import SUPPORTED_MODEL_TYPES, patch_hf_model, patched_hf_model, unpatch_hf_model  # noqa: E402
from unigen.kernels.dropin import hf_patch  # noqa: E402
from unigen.kernels.dropin.hf_patch import is_hf_model_patched  # noqa: E402

VOCAB = 301  # odd, so no tile divides it
SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1,
             eos_token_id=2, pad_token_id=0)


def _config(arch, **overrides):
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif arch == "gemma2":
        # a small cap, so the cap actually bends these logits (Gemma 2 uses 30)
        cfg = transformers.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=2.0)
    else:
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[arch]
        cfg = cls(**SMALL)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _model(arch, *, tied=None, bias=False, seed=0):
    torch.manual_seed(seed)
    overrides = {} if tied is None else {"tie_word_embeddings": tied}
    model = transformers.AutoModelForCausalLM.from_config(_config(arch, **overrides))
    if bias:  # a head with a bias (none of these families has one by default)
        head = model.get_output_embeddings()
        new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(head.weight)
            new.bias.normal_(0, 0.5)
        model.set_output_embeddings(new)
    with torch.no_grad():
        # the init's 0.02 std gives logits ~0.03; a wider head gives a peaked softmax (and makes
        # Gemma 2's cap bend the logits), a test that can tell wrong gradients apart
        model.get_output_embeddings().weight.mul_(40.0)
    return model.eval()  # no dropout: the two runs must see the same network


def _batch(seed=1, batch=3, seq=11):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that carries no loss
    labels[2, -3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    return ids, labels, mask


def _loss_and_grads(model, ids, labels, mask, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs)
    grads = torch.autograd.grad(out.loss, params, allow_unused=True)
    return out, dict(zip([n for n, p in model.named_parameters() if p.requires_grad], grads))


CASES = [(arch, None, False) for arch in SUPPORTED_MODEL_TYPES] + [
    ("llama", True, False),  # tied head (Llama's default is untied)
    ("gpt2", False, False),  # untied head (GPT-2's default is tied)
    ("llama", None, True),  # a head with a bias
]


@pytest.mark.parametrize("arch,tied,bias", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("num_items", [None, 13])
def test_patched_loss_and_every_gradient_match(arch, tied, bias, num_items):
    model = _model(arch, tied=tied, bias=bias)
    ids, labels, mask = _batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    ref, ref_grads = _loss_and_grads(model, ids, labels, mask, **kwargs)
    patch_hf_model(model)
    out, grads = _loss_and_grads(model, ids, labels, mask, **kwargs)
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        if ref_grads[name] is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
    if arch == "gemma2":  # the cap matters here: without it the loss differs
        model.config.final_logit_softcapping = None
        unpatch_hf_model(model)
        uncapped = model(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
        assert not torch.allclose(uncapped, ref.loss, rtol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_backends_agree_and_return_tuple(backend):
    import os

    from unigen._extension import cpp_ops_available

    if backend == "cpp" and not cpp_ops_available():
        pytest.skip("unigen._C not built")
    if backend == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    model = _model("qwen2")
    ids, labels, mask = _batch()
    ref = model(ids, attention_mask=mask, labels=labels).loss
    patch_hf_model(model, backend=backend)
    # positional input_ids, return_dict=False: a tuple (loss first, no logits), as transformers
    out = model(ids, attention_mask=mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple)
    torch.testing.assert_close(out[0], ref, rtol=1e-5, atol=1e-6)
    # labels given positionally (Qwen2: input_ids, attention_mask, position_ids, cache, inputs_embeds,
    # labels) are fused too
    out = model(ids, mask, None, None, None, labels)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)


def test_shift_labels_given_and_all_ignored():
    model = _model("mistral")
    ids, labels, mask = _batch()
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    shift[1, 2] = -100
    ref = model(ids, attention_mask=mask, labels=labels, shift_labels=shift).loss
    patch_hf_model(model)
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels, shift_labels=shift).loss, ref)
    nothing = torch.full_like(labels, -100)  # 0/0, as transformers' mean: nan
    assert torch.isnan(model(ids, labels=nothing).loss)


@pytest.mark.parametrize("arch", list(SUPPORTED_MODEL_TYPES))
def test_without_labels_and_generate_unchanged(arch):
    model = _model(arch)
    ids = _batch()[0][:2, :5]
    before = model(ids).logits
    gen_before = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    patch_hf_model(model)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    gen_after = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_after, gen_before)


def test_refusals_name_the_reason():
    cfg = transformers.BartConfig(d_model=16, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layers=1,
                                  decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                                  vocab_size=50, max_position_embeddings=32)
    with pytest.raises(ValueError, match=r"unsupported model BartForCausalLM: .*does not call self.loss_function"):
        patch_hf_model(transformers.BartForCausalLM(cfg))
    with pytest.raises(TypeError, match="transformers model instance"):
        patch_hf_model("gpt2")
    with pytest.raises(ValueError, match=r"unsupported model Linear: not a transformers PreTrainedModel"):
        patch_hf_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['z_loss'\]"):
        patch_hf_model(_model("llama"), z_loss=1e-4)
    custom = _model("llama")
    custom.loss_function = lambda *a, **k: torch.zeros(())
    with pytest.raises(ValueError, match="not transformers' ForCausalLMLoss"):
        patch_hf_model(custom)


# --------------------------------------------------------------------------------------------
# the forward is read, not listed: synthetic families exercise what the reader accepts
# --------------------------------------------------------------------------------------------


class _Scaled(transformers.LlamaForCausalLM):
    """A learnable logit scale and a padded vocabulary, as some families have."""

    def __init__(self, config):
        super().__init__(config)
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = self.lm_head(outputs.last_hidden_state).float() * self.logit_scale
        keep = self.config.unpadded_vocab_size
        if keep is not None and keep < logits.shape[-1]:
            logits = logits[..., :keep]
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, vocab_size=logits.shape[-1], **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _Capped(transformers.LlamaForCausalLM):
    """A soft-cap written another way (walrus, tanh(x/c)*c) after a scale, and an aux loss."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = self.lm_head(outputs.last_hidden_state)
        logits /= self.config.logits_scaling
        if (cap := getattr(self.config, "cap", None)) is not None:
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = loss + 0.5 * outputs.last_hidden_state.square().mean()  # kept, as a router loss
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _EvalBranch(transformers.LlamaForCausalLM):
    """A branch the op cannot express (xLSTM's evaluation path): that call runs unfused."""

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask)
        logits = self.lm_head(outputs.last_hidden_state)
        if not self.training:
            logits[:, :, :3] = -1e4
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        return transformers.modeling_outputs.CausalLMOutputWithPast(loss=loss, logits=logits)


class _Masked(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        logits[:, :, 5] = float("-inf")  # Chameleon masks its image tokens so
        return transformers.modeling_outputs.CausalLMOutputWithPast(
            loss=self.loss_function(logits, labels, self.vocab_size), logits=logits)


class _TwoHeads(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        hidden = self.model(input_ids=input_ids).last_hidden_state
        logits = self.lm_head(hidden) + self.lm_head(hidden.flip(1))
        return transformers.modeling_outputs.CausalLMOutputWithPast(
            loss=self.loss_function(logits, labels, self.vocab_size), logits=logits)


class _ShiftedLabels(transformers.LlamaForCausalLM):
    def forward(self, input_ids=None, labels=None, **kwargs):
        logits = self.lm_head(self.model(input_ids=input_ids).last_hidden_state)
        labels = labels.roll(1, dims=-1)
        return transformers.modeling_outputs.CausalLMOutputWithPast(
            loss=self.loss_function(logits, labels, self.vocab_size), logits=logits)


def _synthetic(cls, seed=0, **config):
    torch.manual_seed(seed)
    model = cls(_config("llama", **config)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("cls,config,described", [
    (_Scaled, {"unpadded_vocab_size": VOCAB - 20}, "×self.logit_scale; if keep is not None"),
    (_Scaled, {"unpadded_vocab_size": None}, "[..., :keep]"),
    (_Capped, {"logits_scaling": 4.0, "cap": 1.5}, "/self.config.logits_scaling; if (cap := "),
    (_Capped, {"logits_scaling": 0.5, "cap": None}, "tanh"),
])
def test_read_processing_is_fused(cls, config, described):
    model = _synthetic(cls, **config)
    ids, labels, mask = _batch()
    labels[labels >= VOCAB - 20] = -100  # (the padded rows are not classes of the loss)
    ref, ref_grads = _loss_and_grads(model, ids, labels, mask)
    assert described in hf_patch.read_hf_model(model).describe()
    patch_hf_model(model)
    out, grads = _loss_and_grads(model, ids, labels, mask)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():  # the learnable scale's gradient included
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_a_branch_the_op_cannot_express_runs_unfused():
    model = _synthetic(_EvalBranch)
    ids, labels, mask = _batch()
    patch_hf_model(model)
    assert "unfused" in hf_patch.read_hf_model(model).describe()
    evaluated = model(input_ids=ids, attention_mask=mask, labels=labels)  # eval: the model's own loss
    assert evaluated.logits is not None and torch.isfinite(evaluated.loss)
    model.train()
    trained = model(input_ids=ids, attention_mask=mask, labels=labels)  # training: fused
    assert trained.logits is None
    unpatch_hf_model(model)
    torch.testing.assert_close(trained.loss, model(input_ids=ids, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("cls,reason", [
    (_Masked, r"line \d+: `logits\[:, :, 5\] = float\('-inf'\)` changes or reads the logits"),
    (_TwoHeads, r"calls self.lm_head 2 times"),
    (_ShiftedLabels, r"changes `labels` before its loss"),
])
def test_unexpressible_forwards_are_refused_with_the_line(cls, reason):
    with pytest.raises(ValueError, match=reason):
        patch_hf_model(_synthetic(cls))


def test_a_head_with_its_own_forward_is_refused():
    class ScaledHead(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    model = _model("llama")
    model.lm_head = ScaledHead(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match="has a forward of its own"):
        patch_hf_model(model)


def test_double_patch_unpatch_and_context_manager():
    model = _model("llama")
    ids, labels, mask = _batch()
    ref = model(ids, attention_mask=mask, labels=labels).loss
    original = type(model).forward
    assert patch_hf_model(model) is model and patch_hf_model(model, backend="torch") is model
    assert model.forward.__wrapped__.__func__ is original  # wrapped once, not twice
    torch.testing.assert_close(model(ids, attention_mask=mask, labels=labels).loss, ref)
    unpatch_hf_model(model)
    assert "forward" not in model.__dict__ and not is_hf_model_patched(model)
    unpatch_hf_model(model)  # harmless on an unpatched model
    assert model(ids, attention_mask=mask, labels=labels).logits is not None
    with patched_hf_model(model) as m:
        assert m(ids, attention_mask=mask, labels=labels).logits is None
    assert model(ids, attention_mask=mask, labels=labels).logits is not None


def test_bf16_autocast_matches_unpatched():
    """Under bf16 autocast the patched loss and gradients are at least as close to the fp32 ones as
    transformers' own bf16 computation (which also rounds its logits to bf16): the house accuracy
    rule, at most 2x the error of the same-precision PyTorch computation."""
    model = _model("llama")
    ids, labels, mask = _batch()
    exact, exact_grads = _loss_and_grads(model, ids, labels, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ref_grads = _loss_and_grads(model, ids, labels, mask)
        patch_hf_model(model)
        out, grads = _loss_and_grads(model, ids, labels, mask)
    assert out.loss.dtype == ref.loss.dtype == torch.float32
    assert (out.loss - exact.loss).abs() <= 2 * (ref.loss - exact.loss).abs() + 1e-3
    for name, g in grads.items():
        ours = (g - exact_grads[name]).abs().max()
        theirs = (ref_grads[name] - exact_grads[name]).abs().max()
        assert ours <= 2 * theirs + 1e-4, (name, ours.item(), theirs.item())


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma2"])
def test_torch_compile_has_no_graph_break(arch):
    model = _model(arch)
    ids, labels, mask = _batch()
    patch_hf_model(model)
    eager = model(ids, attention_mask=mask, labels=labels).loss
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(ids, attention_mask=mask, labels=labels)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    loss.backward()  # the backward traces too
    assert model.get_output_embeddings().weight.grad is not None
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# memory: the patched step never holds the [tokens, vocab] logits
# --------------------------------------------------------------------------------------------


def _rss_high_water_mb(step):
    """Resident-set high-water mark (MiB above the start) of ``step()``, read from the kernel.

    glibc serves blocks above its mmap threshold with their own mappings, returned at free, so
    the resident set follows the live memory; the threshold is pinned at 1 MiB here (by default it
    grows to 32 MiB as blocks are freed, and freed heap pages would hide a new block's size).
    """
    def status(key):
        return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    start = status("VmRSS")
    step()
    return status("VmHWM") - start


def test_patched_step_peak_memory_far_below_the_logits():
    try:
        libc = ctypes.CDLL("libc.so.6")
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs and glibc")
    M_MMAP_THRESHOLD = -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=2, n_positions=256, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50257, (4, 256))
    logits_mb = ids.numel() * cfg.vocab_size * 4 / 2**20  # fp32 [1024, 50257]: ~196 MiB

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(ids, labels=ids).loss.backward()
        return run

    patched = patch_hf_model(copy.deepcopy(model))
    step(patched)()  # warm-up: first-call allocations, lazily built state
    patched_mb = _rss_high_water_mb(step(patched))
    step(model)()
    unpatched_mb = _rss_high_water_mb(step(model))
    # the unpatched step holds at least the logits and their gradient; the patched one only its
    # bounded logits blocks, the head's gradient (12 MiB here) and the activations
    assert unpatched_mb > 1.5 * logits_mb, (unpatched_mb, logits_mb)
    assert patched_mb < 0.4 * logits_mb, (patched_mb, logits_mb)


# --------------------------------------------------------------------------------------------
# transformers.Trainer
# --------------------------------------------------------------------------------------------


def test_trainer_steps_give_the_same_losses(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    import unigen.kernels.dropin.hf_patch as hf_patch

    reductions = []  # the Trainer passes num_items_in_batch: the patch must take the "sum" path
    fused_ce = hf_patch.fused_linear_cross_entropy
    monkeypatch.setattr(hf_patch, "fused_linear_cross_entropy",
                        lambda *a, **k: reductions.append(k["reduction"]) or fused_ce(*a, **k))

    class Samples(torch.utils.data.Dataset):
        def __init__(self):
            g = torch.Generator().manual_seed(5)
            self.items = []
            for i in range(8):
                ids = torch.randint(3, VOCAB, (12,), generator=g)
                labels = ids.clone()
                labels[: 2 + i % 5] = -100  # a different number of loss tokens per sample
                self.items.append({"input_ids": ids, "labels": labels})

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def run(model, sub):
        args = TrainingArguments(
            output_dir=str(tmp_path / sub), max_steps=3, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
            disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Samples())
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    base = _model("llama").train()
    plain = run(copy.deepcopy(base), "plain")
    fused_model = patch_hf_model(copy.deepcopy(base))
    fused = run(fused_model, "fused")
    assert len(plain) == len(fused) == 3
    assert plain[0] != plain[2]  # the model trained
    for a, b in zip(fused, plain):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (fused, plain)
    assert is_hf_model_patched(fused_model)  # the Trainer kept our forward
    assert reductions == ["sum"] * 6  # 3 steps x 2 accumulated micro-batches


@pytest.mark.parametrize("model_type,class_name", [
    ("cohere", "CohereForCausalLM"),  # × logit_scale
    ("granite", "GraniteForCausalLM"),  # / logits_scaling
    ("mixtral", "MixtralForCausalLM"),  # a router loss added after the fused one
])
def test_torch_compile_no_graph_break_across_logit_processing(model_type, class_name):
    from .hf_families import build_tiny, text_batch

    model = build_tiny(model_type, class_name)
    model.config.output_router_logits = True  # Mixtral: its auxiliary loss joins the loss
    batch = text_batch(model)
    torch._dynamo.reset()
    unpatched = torch._dynamo.explain(model)(**batch).graph_break_count
    patch_hf_model(model)
    eager = model(**batch).loss
    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(**batch)
    # (unpatched, Mixtral breaks once, in transformers' own loss path; patched, none does)
    assert explain.graph_break_count == 0, (explain.break_reasons, unpatched)
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(compiled(**batch).loss, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
