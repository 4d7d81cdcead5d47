"""LAVIS BLIP-2 checkpoint → UniGen Q-Former: key remapping and numerical equivalence.

The LAVIS-named state dict is derived from a Hugging Face ``Blip2QFormerModel`` (an independent
implementation of the same Q-Former) by renaming its keys to LAVIS's layout and adding the
entries a real LAVIS checkpoint carries besides (text path, ViT, heads). After loading it, our
Q-Former must reproduce the HF model's query outputs.
"""

import math

import pytest
import torch

from unigen.model.config import UniGenConfig
from unigen.model.lavis_remap import load_lavis_qformer_checkpoint, remap_lavis_qformer_state_dict
from unigen.model.unigen_model import UniGen


def hf_to_lavis_name(key: str) -> str:
    # HF: encoder.layer.N.attention.attention.query / layernorm; LAVIS: ...attention.self.query /
    # embeddings.LayerNorm, all under Qformer.bert.
    if key.startswith("layernorm."):
        return "Qformer.bert.embeddings.LayerNorm." + key.split(".", 1)[1]
    key = key.replace(".attention.attention.", ".attention.self.")
    key = key.replace(".crossattention.attention.", ".crossattention.self.")
    return "Qformer.bert." + key


@pytest.fixture(scope="module")
def setup():
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    torch.manual_seed(0)
    cfg = UniGenConfig.tiny()
    q, v = cfg.qformer, cfg.vision
    hf = Blip2QFormerModel(Blip2QFormerConfig(
        vocab_size=30, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
        encoder_hidden_size=v.hidden_size, cross_attention_frequency=q.cross_attention_freq,
        layer_norm_eps=q.layer_norm_eps)).eval()
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a swapped key would show
        for n, p in hf.named_parameters():
            if "LayerNorm" in n or "layernorm" in n:
                p.add_(0.1 * torch.randn_like(p))
    lavis = {hf_to_lavis_name(k): v_ for k, v_ in hf.state_dict().items()}
    H = q.hidden_size
    lavis.update({
        "query_tokens": torch.randn(1, q.num_query_tokens, H),
        "ln_vision.weight": 1 + 0.1 * torch.randn(v.hidden_size),
        "ln_vision.bias": 0.1 * torch.randn(v.hidden_size),
        "vision_proj.weight": torch.randn(cfg.loss.contrastive_dim, H),
        "vision_proj.bias": torch.randn(cfg.loss.contrastive_dim),
        "temp": torch.tensor(0.05),
        # Entries of a real checkpoint UniGen does not use:
        "Qformer.bert.embeddings.word_embeddings.weight": torch.randn(30, H),
        "Qformer.bert.embeddings.position_embeddings.weight": torch.randn(512, H),
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.randn(q.intermediate_size, H),
        "Qformer.bert.encoder.layer.0.output.dense.weight": torch.randn(H, q.intermediate_size),
        "Qformer.bert.encoder.layer.0.output.LayerNorm.weight": torch.randn(H),
        "Qformer.cls.predictions.bias": torch.randn(30),
        "visual_encoder.blocks.0.attn.qkv.weight": torch.randn(3, 3),
        "text_proj.weight": torch.randn(cfg.loss.contrastive_dim, H),
        "itm_head.weight": torch.randn(2, H),
    })
    return cfg, hf, lavis


def test_remap_names(setup):
    cfg, _, lavis = setup
    res = remap_lavis_qformer_state_dict({"model": lavis})
    sd = res.state_dict
    assert torch.equal(sd["image_encoder.qformer.layers.0.cross_attn.k.weight"],
                       lavis["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(sd["image_encoder.qformer.layers.1.mlp.fc2.weight"],
                       lavis["Qformer.bert.encoder.layer.1.output_query.dense.weight"])
    assert torch.equal(sd["image_encoder.qformer.embed_norm.bias"],
                       lavis["Qformer.bert.embeddings.LayerNorm.bias"])
    assert torch.equal(sd["image_proj.weight"], lavis["vision_proj.weight"])
    assert math.isclose(float(sd["logit_scale"]), math.log(1 / 0.05), rel_tol=1e-6)
    assert "image_encoder.qformer.layers.1.cross_attn.q.weight" not in sd  # odd layers: none
    assert set(res.ignored) == {
        "Qformer.bert.embeddings.word_embeddings.weight",
        "Qformer.bert.embeddings.position_embeddings.weight",
        "Qformer.bert.encoder.layer.0.intermediate.dense.weight",
        "Qformer.bert.encoder.layer.0.output.dense.weight",
        "Qformer.bert.encoder.layer.0.output.LayerNorm.weight",
        "Qformer.cls.predictions.bias", "visual_encoder.blocks.0.attn.qkv.weight",
        "text_proj.weight", "itm_head.weight"}


def test_loaded_qformer_matches_the_reference_implementation(setup, tmp_path):
    cfg, hf, lavis = setup
    model = UniGen(cfg).eval()
    torch.save({"model": lavis}, tmp_path / "blip2.pth")
    load_lavis_qformer_checkpoint(model, tmp_path / "blip2.pth")
    feats = torch.randn(3, cfg.vision.num_patches + 1, cfg.vision.hidden_size)
    with torch.no_grad():
        ours = model.image_encoder.qformer(feats)
        ref = hf(query_embeds=lavis["query_tokens"].expand(3, -1, -1),
                 encoder_hidden_states=feats).last_hidden_state
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.image_encoder.ln_vision.weight, lavis["ln_vision.weight"])
    assert math.isclose(float(model.logit_scale_value().detach()), 20.0, rel_tol=1e-5)


def test_mismatched_checkpoint_is_refused(setup):
    cfg, _, lavis = setup
    model = UniGen(cfg)
    before = model.image_encoder.qformer.query_tokens.detach().clone()
    partial = {k: v for k, v in lavis.items() if "layer.1." not in k}
    with pytest.raises(ValueError, match=r"missing keys: \['image_encoder.qformer.layers.1"):
        load_lavis_qformer_checkpoint(model, partial)
    wrong = dict(lavis, query_tokens=torch.randn(1, 32, 768))
    with pytest.raises(ValueError, match="query_tokens: checkpoint"):
        load_lavis_qformer_checkpoint(model, wrong)
    with pytest.raises(ValueError, match="unknown Q-Former key"):
        remap_lavis_qformer_state_dict({"Qformer.bert.encoder.layer.0.adapter.weight": torch.zeros(1)})
    # Nothing was written by the refused loads.
    assert torch.equal(model.image_encoder.qformer.query_tokens, before)
    with pytest.raises(FileNotFoundError):
        load_lavis_qformer_checkpoint(model, "no/such/file.pth")
