"""save_pretrained / from_pretrained: exact round trip, clear errors on mismatched or damaged
checkpoints; building from local pre-trained parts (HF directories written here, offline)."""

import json
import os
import warnings

import pytest
import torch

from unigen.data.examples import Example, collate_examples
from unigen.model.config import UniGenConfig
from unigen.model.pretrained import CheckpointError
from unigen.model.unigen_model import UniGen


def trained_model(tokenizers):
    torch.manual_seed(0)
    m = UniGen.tiny(tokenizers)
    m.configure_backends(kernels="torch", attention="torch")
    m.config.loss.alpha = 0.3
    # One optimizer step so that no weight equals its initial value.
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(batch_of(m)).loss.backward()
    opt.step()
    return m


def batch_of(m):
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ex = [Example(task="cap", image=img, image_id=0, target="a red cat", pair_text="un chat rouge"),
          Example(task="trans", text="ein Hund", target="a dog")]
    return collate_examples(ex, text_tokenizer=m.text_tokenizer, decoder_tokenizer=m.decoder_tokenizer,
                            image_size=m.config.vision.image_size, max_text_length=m.config.text.max_length)


def test_round_trip_is_exact(tokenizers, tmp_path):
    m = trained_model(tokenizers)
    m.save_pretrained(tmp_path / "ck")
    assert sorted(os.listdir(tmp_path / "ck")) == ["config.json", "decoder_tokenizer", "model.safetensors",
                                                  "text_tokenizer"]
    back = UniGen.from_pretrained(tmp_path / "ck")
    assert back.config == m.config
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # Frozen parts stay frozen, the tied head is still tied, tokenizers came back.
    assert not any(p.requires_grad for p in back.image_encoder.clip.parameters())
    assert back.decoder.lm_head_weight is back.decoder.wte.weight
    assert back.decoder_tokenizer.get_vocab() == m.decoder_tokenizer.get_vocab()
    m.eval()
    back.eval()
    batch = batch_of(m)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(m(batch, generator=g1).loss, back(batch, generator=g2).loss, rtol=0, atol=0)
    assert back.translate(["ein Hund"], max_new_tokens=4) == m.translate(["ein Hund"], max_new_tokens=4)


def test_missing_and_unexpected_keys_are_listed(tokenizers, tmp_path):
    from safetensors.torch import load_file, save_file

    m = trained_model(tokenizers)
    m.save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    sd = load_file(path)
    del sd["image_encoder.qformer.query_tokens"]
    sd["decoder.h.0.extra.weight"] = torch.zeros(2)
    save_file(sd, path)
    with pytest.raises(CheckpointError) as e:
        UniGen.from_pretrained(tmp_path / "ck")
    msg = str(e.value)
    assert "missing keys: image_encoder.qformer.query_tokens" in msg
    assert "unexpected keys: decoder.h.0.extra.weight" in msg


def test_config_weight_mismatch_is_an_error(tokenizers, tmp_path):
    m = trained_model(tokenizers)
    m.save_pretrained(tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["qformer"]["num_hidden_layers"] = 3     # a layer the weights do not have
    cfg["loss"]["contrastive_dim"] = 8          # projections of another shape
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        UniGen.from_pretrained(tmp_path / "ck")
    msg = str(e.value)
    assert "image_encoder.qformer.layers.2." in msg and "image_proj.weight: file (16, 32) vs model (8, 32)" in msg


def test_truncated_or_missing_files(tokenizers, tmp_path):
    m = trained_model(tokenizers)
    m.save_pretrained(tmp_path / "ck")
    path = tmp_path / "ck" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        UniGen.from_pretrained(tmp_path / "ck")
    path.unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        UniGen.from_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="no config.json"):
        UniGen.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "ck" / "config.json").write_text('{"loss": {"alpha": "x"}}')
    with pytest.raises(CheckpointError, match="alpha"):
        UniGen.from_pretrained(tmp_path / "ck")


def test_build_from_local_pretrained_parts(tokenizers, tmp_path):
    """HF-format CLIP, XLM-R and GPT-2 directories (tiny, written here) load into UniGen, with
    every part's weights and the tokenizers taken from its directory."""
    import shutil

    from transformers import CLIPConfig, CLIPModel, GPT2Config, GPT2LMHeadModel, XLMRobertaConfig, XLMRobertaModel

    torch.manual_seed(0)
    base = UniGenConfig.tiny()
    v = base.vision
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size,
                           intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                           num_attention_heads=v.num_attention_heads),
        text_config=dict(vocab_size=99, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=20), projection_dim=8))
    clip.save_pretrained(tmp_path / "clip")
    t = base.text
    xlmr = XLMRobertaModel(XLMRobertaConfig(
        vocab_size=tokenizers.text_vocab_size, hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
        type_vocab_size=1, pad_token_id=1))
    xlmr.save_pretrained(tmp_path / "xlmr")
    shutil.copytree(tokenizers.text_dir, tmp_path / "xlmr", dirs_exist_ok=True)
    d = base.decoder
    # 6 blocks where the config says 4: the checkpoint's depth wins, and the frozen blocks are
    # the middle half of it
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=tokenizers.decoder_vocab_size, n_positions=d.n_positions,
                                      n_embd=d.n_embd, n_layer=6, n_head=d.n_head))
    gpt2.save_pretrained(tmp_path / "gpt2")
    shutil.copytree(tokenizers.decoder_dir, tmp_path / "gpt2", dirs_exist_ok=True)
    # A GPT-2 tokenizer directory without the task tokens (as the real gpt2 one).
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizers.decoder_dir)
    assert plain.convert_tokens_to_ids("[cap]") == tokenizers.decoder_vocab_size + 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a tiny Q-Former without a checkpoint is no surprise
        m = UniGen.from_pretrained_parts(clip_dir=tmp_path / "clip", xlmr_dir=tmp_path / "xlmr",
                                         gpt2_dir=tmp_path / "gpt2", config=base)
    assert m.config.decoder.n_layer == 6 and m.config.decoder.frozen_blocks == (1, 2, 3)
    assert [b.attn.c_attn.weight.requires_grad for b in m.decoder.h] == [True, False, False, False,
                                                                         True, True]
    ours = m.image_encoder.clip.state_dict()
    n_used = base.vision.num_layers_used
    ref = {k: v for k, v in clip.state_dict().items() if "vision_model" in k}
    for k, val in ours.items():
        src = ref.get("vision_model." + k)
        assert src is not None and torch.equal(val, src.to(val.dtype)), k
    assert f"encoder.layers.{n_used}.mlp.fc1.weight" not in ours  # layers after the feature layer dropped
    for k, val in m.text_encoder.model.state_dict().items():
        assert torch.equal(val, xlmr.state_dict()[k]), k
    V = tokenizers.decoder_vocab_size
    assert torch.equal(m.decoder.wte.weight[:V], gpt2.transformer.wte.weight)
    assert torch.equal(m.decoder.h[1].attn.c_attn.weight, gpt2.transformer.h[1].attn.c_attn.weight.t())
    assert m.decoder.vocab_size == V + 4 and m.config.decoder.vocab_size == V
    assert not m.decoder.h[1].attn.c_attn.weight.requires_grad  # middle layers frozen
    assert m.config.text.vocab_size == tokenizers.text_vocab_size
    assert m.text_tokenizer is not None and m.config.tasks.eos_token_id == plain.eos_token_id
    assert m.config.tasks.match_yes_ids == tuple(plain("yes", add_special_tokens=False)["input_ids"])



def test_from_pretrained_is_in_eval_mode_and_a_run_folder_gets_a_hint(tokenizers, tmp_path):
    m = trained_model(tokenizers)
    assert m.training
    run = tmp_path / "run"
    m.save_pretrained(run / "checkpoints" / "step_00000010" / "model")
    m.save_pretrained(run / "final_model")
    back = UniGen.from_pretrained(run / "final_model")
    assert not back.training and not any(mod.training for mod in back.modules())
    with pytest.raises(CheckpointError, match=r"training run or checkpoint folder: the model is in "
                                              r"'.*final_model' or '.*step_00000010.model'"):
        UniGen.from_pretrained(run)
    with pytest.raises(CheckpointError, match=r"no config.json in '[^']*'$"):
        UniGen.from_pretrained(tmp_path / "elsewhere")


def test_a_paper_size_qformer_without_its_checkpoint_is_announced():
    from unigen.model.config import QFormerConfig

    base = UniGenConfig.tiny()
    cfg = UniGenConfig.tiny(qformer=QFormerConfig(num_query_tokens=4))  # BLIP-2's size
    cfg.loss.contrastive_dim = base.loss.contrastive_dim
    with pytest.warns(UserWarning, match="Q-Former starts from random weights"):
        UniGen.from_pretrained_parts(config=cfg, load_tokenizers=False)
