"""The UniGen model on the tiny config (CPU): the five losses, packing vs padding, freezing,
overfitting, parameter count, bad input."""

import copy
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F

from unigen.data.examples import Example, collate_examples
from unigen.data.synthetic_text import sentence_of
from unigen.model.batch import UniGenBatch
from unigen.model.config import TASK_NAMES, UniGenConfig
from unigen.model.unigen_model import UniGen

QUESTION = "what is the color of the thing?"
COLORS_EN = ["red", "blue", "green", "black", "white"]


def tiny_model(tokenizers, **loss_overrides):
    torch.manual_seed(0)
    model = UniGen.tiny(tokenizers)
    # The ops' reference paths: fast on CPU.
    model.configure_backends(kernels="torch", attention="torch")
    assert model.decoder.config is model.config.decoder
    for k, v in loss_overrides.items():
        setattr(model.config.loss, k, v)
    return model


def make_image(k: int) -> torch.Tensor:
    """A 40x40 uint8 image that is easy to tell apart from the others: its own background
    colour and a bright square at its own place (noise would blur to grey when resized)."""
    g = torch.Generator().manual_seed(k)
    img = torch.empty(3, 40, 40, dtype=torch.uint8)
    img[:] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    y, x = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
    img[:, y:y + 16, x:x + 16] = 255 - img[:, y:y + 16, x:x + 16]
    return img


def make_examples(seed=0, n_cap=3, n_trans=2, n_qus=2):
    rng = random.Random(seed)
    images = [make_image(seed * 10 + i) for i in range(n_cap + n_qus)]
    ex = []
    for i in range(n_cap):
        ids = (i % 5, (2 * i + 1) % 6, i % 4)
        ex.append(Example(task="cap", image=images[i], image_id=i, target=sentence_of("en", ids),
                          pair_text=sentence_of(rng.choice(["en", "fr", "de"]), ids)))
    for i in range(n_trans):
        ids = ((i + 2) % 5, (i + 3) % 6, (i + 1) % 4)
        ex.append(Example(task="trans", text=sentence_of(["fr", "de"][i % 2], ids),
                          target=sentence_of("en", ids)))
    for i in range(n_qus):
        ex.append(Example(task="qus", image=images[n_cap + i], image_id=100 + i, text=QUESTION,
                          target=COLORS_EN[(3 * i + 1) % 5]))
    return ex


def collate(model, examples):
    v = model.config.vision
    return collate_examples(examples, text_tokenizer=model.text_tokenizer,
                            decoder_tokenizer=model.decoder_tokenizer, image_size=v.image_size,
                            image_mean=v.image_mean, image_std=v.image_std,
                            max_text_length=model.config.text.max_length)


def test_batch_layout(tokenizers):
    model = tiny_model(tokenizers)
    b = collate(model, make_examples())
    assert b.num_samples == 7 and b.num_pairs == 3 and b.num_images == 5
    assert b.task_counts() == {"trans": 2, "cap": 3, "qus": 2, "match": 0}
    # Targets end with eos; the question is stored once although two samples use it.
    eos = model.decoder_tokenizer.eos_token_id
    assert all(int(b.target_ids[int(c) - 1]) == eos for c in b.target_cu_seqlens[1:])
    assert sum(1 for i in b.text_index.tolist() if i >= 0) == 4
    assert len(set(b.text_index[b.task == 2].tolist())) == 1
    decoded = model.decoder_tokenizer.decode(
        b.target_ids[int(b.target_cu_seqlens[0]):int(b.target_cu_seqlens[1]) - 1])
    assert decoded == make_examples()[0].target


def test_losses_finite_and_total_matches_formula(tokenizers):
    model = tiny_model(tokenizers, alpha=0.5, beta=2.0, contrastive_weight=1.0)
    out = model(collate(model, make_examples()), generator=torch.Generator().manual_seed(0))
    L = out.losses
    for name in (*TASK_NAMES, "cl"):
        assert torch.isfinite(L[name]) and L[name] > 0, name
    expected = L["trans"] + L["cap"] + 0.5 * L["qus"] + 2.0 * L["match"] + L["cl"]
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-5)
    # [match] = 3 positives + up to 3 mined texts + 3 mined images (3 distinct pair ids).
    assert out.num_samples["match"] == 9 and out.num_pairs == 3
    assert out.num_tokens["total"] == sum(out.num_tokens[t] for t in TASK_NAMES)
    torch.testing.assert_close(out.temperature, torch.tensor(0.07))


def reference_generative_losses(model, batch, extra_match=()):
    """Per-task mean CE computed sample by sample through the padded decoder path and
    materialised logits: independent of the packing code."""
    dec = model.decoder
    task_emb = dec.wte.weight[model.task_token_ids]
    _, e_v = model.encode_images(batch.images)
    _, e_t = model.encode_texts(batch.text_ids, batch.text_mask)
    sums = torch.zeros(4)
    counts = torch.zeros(4)
    samples = [(int(batch.task[s]), int(batch.image_index[s]), int(batch.text_index[s]),
                batch.target_ids[int(batch.target_cu_seqlens[s]):int(batch.target_cu_seqlens[s + 1])])
               for s in range(batch.num_samples)] + list(extra_match)
    for t, i, j, tgt in samples:
        parts = []
        if i >= 0:
            parts.append(e_v[i])
        if j >= 0:
            parts.append(e_t[j][batch.text_mask[j]])
        parts.append(task_emb[t:t + 1])
        prefix = torch.cat(parts)
        x = torch.cat([prefix, dec.wte(tgt[:-1])])[None]
        h = dec.forward_padded(x, torch.tensor([x.shape[1]]), torch.tensor([prefix.shape[0]]))[0]
        logits = h[prefix.shape[0] - 1:] @ dec.lm_head_weight.t()
        sums[t] += F.cross_entropy(logits, tgt, reduction="sum")
        counts[t] += tgt.numel()
    return sums / counts.clamp(min=1), counts


@pytest.mark.parametrize("prefix_attention", ["causal", "bidirectional"])
def test_packed_model_matches_per_sample_reference(tokenizers, prefix_attention):
    model = tiny_model(tokenizers, beta=0.0)  # no [match]: only the batch's own samples
    model.config.decoder.prefix_attention = prefix_attention
    model.eval()
    batch = collate(model, make_examples())
    out = model(batch)
    with torch.no_grad():
        ref, counts = reference_generative_losses(model, batch)
    for t, name in enumerate(TASK_NAMES):
        assert out.num_tokens[name] == int(counts[t])
        torch.testing.assert_close(out.losses[name], ref[t], rtol=1e-4, atol=1e-4)


def test_packed_and_naive_baseline_configs_agree(tokenizers):
    """The fused configuration (packed prefix-LM attention, fused CE, fused contrastive op) and
    the naive baseline (padded SDPA, materialised logits, LAVIS-style mining) give the same
    losses on the same weights (hardest-negative mining makes both deterministic)."""
    fused = tiny_model(tokenizers, hard_negatives="hardest")
    fused.eval()
    naive = copy.deepcopy(fused)
    naive.configure_backends(cross_entropy="naive", contrastive="naive", attention="padded_sdpa")
    assert naive.decoder.config.attention_backend == "padded_sdpa"
    assert fused.decoder.config.attention_backend == "torch"
    batch = collate(fused, make_examples())
    a, b = fused(batch), naive(batch)
    assert b.num_samples == a.num_samples
    for name in (*TASK_NAMES, "cl"):
        torch.testing.assert_close(a.losses[name], b.losses[name], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-4, atol=1e-4)
    # Gradients agree too (spot-check the trainable Q-Former queries and the decoder embedding).
    a.loss.backward()
    b.loss.backward()
    for (n1, p1), (n2, p2) in zip(fused.named_parameters(), naive.named_parameters()):
        if n1 in ("image_encoder.qformer.query_tokens", "decoder.wte.weight", "logit_scale"):
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-3, atol=1e-5)


def test_mined_match_samples_are_scored_like_explicit_ones(tokenizers):
    """The [match] samples the model builds from pairs and mined negatives get exactly the loss
    of the same samples written out by hand."""
    model = tiny_model(tokenizers, hard_negatives="hardest")
    model.eval()
    batch = collate(model, make_examples(n_trans=0, n_qus=0))
    out = model(batch)
    # Recompute the mined negatives with the naive LAVIS-style miner on the same features.
    from unigen.model.baselines import lavis_contrastive_loss

    with torch.no_grad():
        q, _ = model.encode_images(batch.images)
        h, _ = model.encode_texts(batch.text_ids, batch.text_mask)
        cl = lavis_contrastive_loss(model.image_proj(q[batch.pair_image_index, 0]),
                                    model.text_proj(h[batch.pair_text_index, 0]),
                                    model.logit_scale_value(), ids=batch.pair_ids,
                                    negatives="hardest")
        yes = torch.tensor(model._match_answer(True))
        no = torch.tensor(model._match_answer(False))
        pi, pt = batch.pair_image_index.tolist(), batch.pair_text_index.tolist()
        extra = [(3, pi[k], pt[k], yes) for k in range(3)]
        extra += [(3, pi[k], pt[int(cl.neg_text_for_image[k])], no) for k in range(3)]
        extra += [(3, pi[int(cl.neg_image_for_text[k])], pt[k], no) for k in range(3)]
        ref, counts = reference_generative_losses(model, batch, extra)
    assert out.num_tokens["match"] == int(counts[3])
    torch.testing.assert_close(out.losses["match"], ref[3], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.losses["cl"], cl.loss, rtol=1e-4, atol=1e-4)


def test_absent_tasks_contribute_zero(tokenizers):
    model = tiny_model(tokenizers)
    only_trans = collate(model, make_examples(n_cap=0, n_qus=0))
    out = model(only_trans)
    assert out.num_pairs == 0 and out.num_samples["cap"] == 0
    for name in ("cap", "qus", "match", "cl"):
        assert float(out.losses[name]) == 0.0
    torch.testing.assert_close(out.loss.detach(), out.losses["trans"])
    out.loss.backward()
    # Pairs only, no generative sample and no [match]: the loss is L_CL alone.
    model.zero_grad()
    model.config.loss.beta = 0.0
    ex = [Example(task=None, image=e.image, image_id=e.image_id, pair_text=e.pair_text)
          for e in make_examples(n_trans=0, n_qus=0)]
    out = model(collate(model, ex))
    assert out.num_tokens["total"] == 0 and float(out.losses["cl"]) > 0
    torch.testing.assert_close(out.loss.detach(), out.losses["cl"])
    out.loss.backward()
    assert model.logit_scale.grad is not None


def test_positives_sharing_an_id_are_never_mined(tokenizers):
    model = tiny_model(tokenizers)
    ex = make_examples(n_trans=0, n_qus=0)
    for e in ex:  # one image, three captions: all pairs are positives of each other
        e.image, e.image_id = ex[0].image, 7
    out = model(collate(model, ex))
    assert out.num_samples["match"] == 3  # positives only: no candidate negative exists


@pytest.mark.parametrize("same_text_positives, expected", [(True, 3), (False, 9)])
def test_identical_captions_of_different_images(tokenizers, same_text_positives, expected):
    """Three images with one caption: with same_text_positives they are positives of each
    other (only the 3 "yes" samples), without it each gets a mined "no" text and image."""
    model = tiny_model(tokenizers, same_text_positives=same_text_positives)
    ex = make_examples(n_trans=0, n_qus=0)
    for e in ex:
        e.pair_text = ex[0].pair_text
    out = model(collate(model, ex))
    assert out.num_samples["match"] == expected


def test_merging_pair_ids_of_identical_texts_follows_chains():
    from unigen.model.unigen_model import _merge_identical_texts

    ids = torch.tensor([0, 1, 2, 3, 4, 4, 5])
    texts = torch.tensor([[5, 6], [7, 8], [5, 6], [9, 9], [7, 8], [1, 1], [1, 2]])
    # 0~2 share a text; 1~4 share a text and 4~5 an image, so 1, 4, 5 are one group.
    # labels are the smallest dense image-group index of each component
    assert _merge_identical_texts(ids, texts).tolist() == [0, 1, 0, 3, 1, 1, 5]


def test_frozen_parameters_do_not_change_others_do(tokenizers):
    model = tiny_model(tokenizers)
    model.train()
    assert not model.image_encoder.clip.training  # the frozen ViT stays in eval mode
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(collate(model, make_examples())).loss.backward()
    opt.step()
    frozen_layers = model.config.decoder.frozen_blocks
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for n, p in model.named_parameters():
        is_frozen = n.startswith("image_encoder.clip.") or any(
            n.startswith(f"decoder.h.{i}.") for i in frozen_layers)
        assert p.requires_grad == (not is_frozen), n
        if is_frozen:
            assert n not in changed, n
    for n in ("image_encoder.qformer.query_tokens", "image_encoder.ln_vision.weight",
              "image_encoder.proj.weight", "text_encoder.model.embeddings.word_embeddings.weight",
              "decoder.h.0.attn.c_attn.weight", "decoder.h.3.mlp.c_fc.weight",
              "decoder.wte.weight", "image_proj.weight", "text_proj.weight", "logit_scale"):
        assert n in changed, n


def test_overfits_a_batch_of_eight(tokenizers):
    model = tiny_model(tokenizers)
    model.train()
    batch = collate(model, make_examples(n_cap=3, n_trans=3, n_qus=2))
    assert batch.num_samples == 8
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                            betas=(0.9, 0.98), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(40):
        out = model(batch, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else float(out.loss.detach())
    last = float(out.loss.detach())
    assert first > 8 * last, (first, last)


def test_trainable_parameters_of_the_paper_model_on_meta():
    with torch.device("meta"):
        model = UniGen(UniGenConfig.paper())
    n = model.num_parameters()
    cfg = model.config
    # Closed-form count of every trainable part, to cross-check the module tree.
    from unigen.model.qformer import QFormer

    D = 768
    qformer = QFormer.num_parameters_estimate(cfg.qformer, cfg.vision.hidden_size)
    t = cfg.text
    xlmr = (t.vocab_size + t.max_position_embeddings + 1) * D + 2 * D + t.num_hidden_layers * (
        4 * D * D + 4 * D + 2 * D + 2 * D * t.intermediate_size + t.intermediate_size + D + 2 * D)
    block = 4 * D * D + 4 * D + 2 * D * 3072 + 3072 + D + 4 * D
    gpt2 = (50257 + 4) * D + 1024 * D + (12 - 6) * block + 2 * D
    extra = (2 * cfg.vision.hidden_size + (D * D + D) + 2 * (D * 256 + 256)
             + 1)  # ln_vision, E_v proj, CL projections, τ
    assert n == qformer + xlmr + gpt2 + extra
    assert n == 461_978_369  # the paper reports 423M: docs/model.md explains the gap
    assert n - model.decoder.wte.weight.numel() == 423_377_921
    assert model.num_parameters(trainable_only=False) - n > 290e6  # frozen ViT-L (23 layers)
    from unigen.model import count_parameters

    assert count_parameters()["total"]["trainable"] == n


def test_bad_inputs(tokenizers):
    model = tiny_model(tokenizers)
    batch = collate(model, make_examples())
    wrong = UniGenBatch(**{**batch.__dict__, "images": torch.zeros(5, 3, 48, 48)})
    with pytest.raises(ValueError, match="images"):
        model(wrong)
    bad_task = UniGenBatch(**{**batch.__dict__, "task": torch.full_like(batch.task, 9)})
    with pytest.raises(ValueError, match="task"):
        model(bad_task)
    bad_cu = UniGenBatch(**{**batch.__dict__,
                            "target_cu_seqlens": batch.target_cu_seqlens[:-1]})
    with pytest.raises(ValueError, match="target_cu_seqlens"):
        model(bad_cu)
    with pytest.raises(ValueError, match="unknown task 'caption'"):
        collate(model, [Example(task="caption", image=torch.zeros(3, 32, 32), target="x")])
    with pytest.raises(ValueError, match="needs an image"):
        collate(model, [Example(task="cap", target="a cat")])
    with pytest.raises(ValueError, match="empty"):
        collate(model, [])
    with pytest.raises(ValueError, match="neither a task nor a pair_text"):
        collate(model, [Example(task=None, image=torch.zeros(3, 32, 32))])
    with pytest.raises(TypeError, match="UniGenBatch"):
        model({"task": batch.task})
    no_answers = tiny_model(tokenizers)
    no_answers.config.tasks.match_yes_ids = ()
    no_answers.config.tasks.match_no_ids = ()
    with pytest.raises(ValueError, match="match_yes_ids"):
        no_answers(batch)


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = UniGenConfig.tiny().with_naive_baselines()
    cfg.loss.alpha = 0.25
    cfg.tasks.match_yes_ids, cfg.tasks.match_no_ids = (4, 5), (6,)
    cfg.save(tmp_path / "c.json")
    back = UniGenConfig.load(tmp_path / "c.json")
    assert back == cfg and back.decoder.frozen_layers is None  # the middle half, derived
    cfg.decoder.frozen_layers = (0, 3)
    cfg.save(tmp_path / "c.json")
    back = UniGenConfig.load(tmp_path / "c.json")
    assert back == cfg and isinstance(back.decoder.frozen_layers, tuple)
    assert back.decoder.attention_backend == "padded_sdpa" and back.loss.cross_entropy == "naive"
    # config.json goes through the YAML configs' loader: the same errors, naming the key
    with pytest.raises(ValueError, match="unknown config key 'loss.gamma'"):
        UniGenConfig.from_dict({**cfg.to_dict(), "loss": {"gamma": 1.0}})
    with pytest.raises(ValueError, match="bad value 'big' for 'loss.alpha'"):
        UniGenConfig.from_dict({"loss": {"alpha": "big"}})
    with pytest.raises(ValueError, match="hard_negatives"):
        UniGenConfig.tiny(loss=type(cfg.loss)(hard_negatives="random"))
    with pytest.raises(ValueError, match="same_text_positives"):
        type(cfg.loss)(same_text_positives="yes")
    with pytest.raises(ValueError, match="initializer_range"):
        UniGenConfig.from_dict({"text": {"initializer_range": 0.0}})
    with pytest.raises(ValueError, match="image_size"):
        UniGenConfig.from_dict({"vision": {"image_size": 30, "patch_size": 8}})
    assert math.isclose(UniGenConfig.paper().vision.num_layers_used, 23)


def test_frozen_vit_in_bfloat16(tokenizers):
    cfg = UniGenConfig.tiny()
    cfg.vision.compute_dtype = "bfloat16"
    model = UniGen(cfg)
    assert model.image_encoder.clip.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert model.image_encoder.ln_vision.weight.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    q, prefix = model.encode_images(x)
    assert q.dtype == torch.float32 and prefix.shape == (2, 4, cfg.decoder.n_embd)
    prefix.sum().backward()
    assert model.image_encoder.qformer.query_tokens.grad is not None


def test_too_long_target_is_a_clear_error(tokenizers):
    model = tiny_model(tokenizers)
    n = model.config.decoder.n_positions
    ex = [Example(task="trans", text="ein Hund", target=[5] * n)]
    with pytest.raises(ValueError, match="n_positions"):
        model(collate(model, ex))


def _backend_losses(model, batch, kernel_backend, attention_backend):
    m = copy.deepcopy(model)
    m.configure_backends(kernels=kernel_backend, attention=attention_backend)
    out = m(batch)
    out.loss.backward()
    return out, m


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")
def test_every_kernel_backend_gives_the_same_losses(tokenizers):
    """The model on the ops' torch references, on "auto" (the C++ ops on CPU where built) and on
    the Triton kernels (interpreted on CPU): same losses and gradients."""
    model = tiny_model(tokenizers, hard_negatives="hardest")
    model.eval()
    batch = collate(model, make_examples())
    ref, mref = _backend_losses(model, batch, "torch", "torch")
    for kb, ab in (("auto", "auto"), ("triton", "triton")):
        out, m = _backend_losses(model, batch, kb, ab)
        for name in (*TASK_NAMES, "cl"):
            torch.testing.assert_close(out.losses[name], ref.losses[name], rtol=1e-4, atol=1e-4)
        for n in ("image_encoder.qformer.query_tokens", "decoder.wte.weight", "text_proj.weight"):
            torch.testing.assert_close(dict(m.named_parameters())[n].grad,
                                       dict(mref.named_parameters())[n].grad, rtol=1e-3, atol=1e-5)


@pytest.mark.gpu
def test_fused_and_naive_agree_on_gpu_in_bf16(tokenizers):
    model = tiny_model(tokenizers, hard_negatives="hardest").cuda().eval()
    model.configure_backends(kernels="auto", attention="auto")
    naive = copy.deepcopy(model)
    naive.configure_backends(cross_entropy="naive", contrastive="naive", attention="padded_sdpa")
    batch = collate(model, make_examples())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = model(batch), naive(batch)
    for name in (*TASK_NAMES, "cl"):
        torch.testing.assert_close(a.losses[name].float(), b.losses[name].float(), rtol=3e-2, atol=3e-2)
    a.loss.backward()
    assert torch.isfinite(model.image_encoder.qformer.query_tokens.grad).all()


def test_configure_backends_validates():
    model = UniGen.tiny()
    with pytest.raises(ValueError, match="cross_entropy"):
        model.configure_backends(cross_entropy="fast")
    with pytest.raises(ValueError, match="attention_backend"):
        model.configure_backends(attention="flash")
    assert model.config.loss.cross_entropy == "fused"  # unchanged by the refused calls


def test_the_output_is_a_pytree_so_fsdp2_finds_the_loss():
    # FSDP2 attaches its pre-backward all-gather (the resharded tied LM head comes back through
    # it) to the tensors it finds in a module's output; torch < 2.13 looks inside registered
    # dataclasses only
    from torch.utils._pytree import tree_flatten

    from unigen.model.unigen_model import UniGenOutput

    loss = torch.ones((), requires_grad=True)
    out = UniGenOutput(loss=loss, losses={"cap": torch.zeros(())}, temperature=torch.ones(()),
                       num_tokens={"cap": 3}, num_samples={"cap": 1}, num_pairs=0)
    leaves, _ = tree_flatten(out)
    assert any(leaf is loss for leaf in leaves)
