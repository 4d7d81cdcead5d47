"""The paper's preset (configs/paper.yaml) and Table 2's ablations (configs/ablations/): each
loads, the paper's holds §4.2's settings, and each ablation differs from it in exactly the
keys its row switches."""

import os

import pytest

from unigen.configuration import ConfigError, config_to_dict, load_config
from unigen.pretraining import PretrainConfig

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def _load(name: str) -> PretrainConfig:
    return load_config(PretrainConfig, os.path.join(CONFIGS, name))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "ratios":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _diff(a: PretrainConfig, b: PretrainConfig) -> dict:
    fa, fb = _flat(config_to_dict(a)), _flat(config_to_dict(b))
    return {k: fb[k] for k in fa if fa[k] != fb[k] and k != "run.output_dir"}


def test_paper_preset_holds_the_papers_settings():
    cfg = _load("paper.yaml")
    m = cfg.model
    assert (m.vision.image_size, m.qformer.num_query_tokens, m.text.max_length) == (224, 32, 40)
    assert m.decoder.n_layer == 12 and tuple(m.decoder.frozen_blocks) == (3, 4, 5, 6, 7, 8)
    assert cfg.data.batch_size * 8 == 512  # per GPU, on the paper's 8 GPUs
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (1e-4, (0.9, 0.98), 0.05)
    assert (cfg.schedule.epochs, cfg.schedule.warmup_steps, cfg.schedule.decay) == (30, 2000,
                                                                                    "linear")
    assert cfg.data.multilingual_fraction == 0.1 and cfg.data.cc6l_captions == "sampled"
    assert all((cfg.data.image_shards, cfg.data.cc6l, cfg.data.ccqa, cfg.data.wikimatrix))
    assert cfg.init.uses_parts and cfg.init.qformer_checkpoint
    assert (m.loss.contrastive_weight, m.loss.hard_negatives) == (1.0, "sample")


@pytest.mark.parametrize("name, switched", [
    ("cc6l_10.yaml", {}),
    ("cc6l_100.yaml", {"data.cc6l_captions": "all"}),
    ("no_cc6l.yaml", {"data.cc6l": []}),
    ("no_ccqa.yaml", {"data.ccqa": [], "data.ratios": {"trans": 1.0, "cap": 1.0, "match": 1.0}}),
    ("no_ccqa_cc6l.yaml", {"data.cc6l": [], "data.ccqa": [],
                           "data.ratios": {"trans": 1.0, "cap": 1.0, "match": 1.0}}),
    ("no_ccqa_cc6l_cl.yaml", {"data.cc6l": [], "data.ccqa": [],
                              "data.ratios": {"trans": 1.0, "cap": 1.0, "match": 1.0},
                              "model.loss.contrastive_weight": 0.0,
                              "model.loss.hard_negatives": "uniform"}),
])
def test_each_ablation_switches_only_its_rows_keys(name, switched):
    paper, row = _load("paper.yaml"), _load(os.path.join("ablations", name))
    assert _diff(paper, row) == switched
    assert row.run.output_dir != paper.run.output_dir


def test_extends_merges_and_reports_bad_chains(tmp_path):
    (tmp_path / "base.yaml").write_text("optim: {lr: 0.001, weight_decay: 0.1}\nschedule: "
                                        "{steps: 10, warmup_steps: 1}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim: {lr: 0.002}\n")
    cfg = load_config(PretrainConfig, tmp_path / "child.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.schedule.steps) == (0.002, 0.1, 10)
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(PretrainConfig, tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(PretrainConfig, tmp_path / "orphan.yaml")


def test_the_feature_store_preset_is_the_papers_run_without_crops_from_a_store():
    assert _diff(_load("paper.yaml"), _load("paper_features.yaml")) == {
        "data.random_resized_crop": None, "data.image_features": "data/cc3m-vitl14-bf16"}
