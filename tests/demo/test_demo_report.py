"""The demos' seed statistics, the beyond-the-spread marks, Table 2's verdicts, the ablation
switches read from the preset files, and the tiny CLIP that every demo run starts from."""

import os

import pytest
import torch


def _scores(values: dict) -> dict:
    """{setting: {seed: rows}} with every language's metrics set to values[setting][seed]."""
    langs = ("en", "de", "fr", "ja", "es", "sw")
    return {s: {seed: [{"language": lang, "chance": 0.01, "i2t_contrastive": v,
                        "t2i_contrastive": v, "i2t_rerank": v, "t2i_rerank": v, "qa_accuracy": v}
                       for lang in langs] for seed, v in enumerate(vals)}
            for s, vals in values.items()}


def test_beyond_spread_needs_disjoint_ranges():
    from unigen.demo.report import beyond_spread

    assert beyond_spread([5, 6, 7], [1, 2, 4]) == "▲"
    assert beyond_spread([1, 2, 4], [5, 6, 7]) == "▼"
    assert beyond_spread([1, 5, 7], [4, 6, 8]) == ""  # overlapping: within the spread
    assert beyond_spread([9], [1]) == ""  # one seed has no spread to compare with


def test_cells_are_mean_and_sample_sd_in_percent():
    from unigen.demo.report import cell, per_seed

    scores = _scores({"a": [0.10, 0.20, 0.30]})
    values = per_seed(scores, "a", ["en", "sw"], "qa_accuracy")
    assert values == pytest.approx([10.0, 20.0, 30.0])
    assert cell(values, "▲") == "20 ± 10 ▲"


def test_comparison_table_marks_only_disjoint_differences():
    from unigen.demo.report import comparison_table

    scores = _scores({"u": [0.5, 0.6, 0.7], "a": [0.1, 0.2, 0.3]})
    table = comparison_table(scores, {"u": "UniGen", "a": "ablation"}, ("en", "sw"), ("de",),
                             0.21, against="a")
    assert "| en | yes | UniGen | 60 ± 10 ▲ |" in table
    assert "| sw | **no** | ablation | 20 ± 10 |" in table
    assert "| sw | **no** | chance | 1 | 1 | 1 | 1 | 21 |" in table


def test_table2_verdicts_follow_the_paper_direction():
    from unigen.data.synthetic_world import WorldFiles
    from unigen.demo.ablations import ROWS, directions_table

    world = WorldFiles(root="", image_shards=[], cc6l="", ccqa="", wikimatrix=[],
                       eval_image_shards=[], eval_captions="", eval_qa="")
    # every row of the paper is below its full model: a row clearly below reproduces, one
    # clearly above is opposite, one overlapping is within the spread
    values = {"full": [0.5, 0.6, 0.7], "no_cc6l": [0.1, 0.2, 0.3], "no_ccqa": [0.8, 0.9, 0.95],
              "no_ccqa_cc6l": [0.45, 0.55, 0.65], "no_ccqa_cc6l_cl": [0.0, 0.0, 0.0]}
    table, verdicts = directions_table(_scores(values), world)
    got = {(row, col): v for row, col, v in verdicts}
    assert len(verdicts) == 3 * (len(ROWS) - 1)
    assert got[("-w/o CC6L", "QA")] == "reproduces"
    assert got[("-w/o CCQA3M", "IR")] == "opposite"
    assert got[("-w/o CCQA3M+CC6L", "TR")] == "same sign, within spread"
    assert "| -w/o CC6L | -40.0 ± 0.0 ▼ | -0.86 | reproduces |" in table


def test_preset_switches_come_from_the_ablation_files():
    from unigen.demo.ablations import PRESETS, ROWS, preset_switches

    for _, _, filename in ROWS[1:]:
        assert os.path.isfile(os.path.join(PRESETS, filename))
    no_cl = preset_switches("no_ccqa_cc6l_cl.yaml")
    assert "extends" not in no_cl and "run" not in no_cl
    assert no_cl["model"]["loss"]["contrastive_weight"] == 0.0
    assert no_cl["data"]["cc6l"] == [] and no_cl["data"]["ccqa"] == []
    with pytest.raises(FileNotFoundError, match="ablation preset"):
        preset_switches("no_such_row.yaml")


def test_with_switches_merges_over_a_config():
    from unigen.demo.ablations import preset_switches
    from unigen.demo.runs import with_switches
    from unigen.pretraining import PretrainConfig
    from unigen.training.config import RunConfig

    base = PretrainConfig(run=RunConfig(output_dir="somewhere"))
    cfg = with_switches(base, preset_switches("no_ccqa_cc6l_cl.yaml"))
    assert cfg.model.loss.contrastive_weight == 0.0 and cfg.model.loss.hard_negatives == "uniform"
    assert "qus" not in cfg.data.ratios and cfg.data.ccqa == ()
    assert cfg.run.output_dir == "somewhere" and cfg.optim == base.optim


@pytest.mark.timeout(300)
def test_tiny_clip_trains_and_loads_as_unigens_vit(tmp_path):
    from unigen.data.synthetic_world import write_synthetic_world
    from unigen.demo.runs import demo_vision
    from unigen.demo.tiny_clip import train_tiny_clip
    from unigen.model import UniGen
    from unigen.model.config import UniGenConfig

    world = write_synthetic_world(str(tmp_path / "w"), num_images=64, num_text_pairs=1,
                                  num_eval_images=16, image_size=32, max_objects=1, seed=3)
    vision = demo_vision(frozen=False)
    runs = [train_tiny_clip(world.image_shards, str(tmp_path / f"clip{i}"), vision=vision,
                            steps=steps, batch_size=32, seed=0,
                            eval_shards=world.eval_image_shards, log_every=0)
            for i, steps in enumerate((1, 40))]
    assert runs[1]["final_loss"] < runs[0]["final_loss"]
    assert 0.0 <= runs[1]["eval_i2t_r1"] <= 1.0
    model = UniGen.from_pretrained_parts(clip_dir=str(tmp_path / "clip1"),
                                         config=UniGenConfig.tiny(vision=demo_vision()),
                                         load_tokenizers=False)
    from transformers import CLIPVisionModel

    saved = CLIPVisionModel.from_pretrained(str(tmp_path / "clip1")).state_dict()
    for key, value in model.image_encoder.clip.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert model.config.vision.frozen and model.config.vision.patch_size == 4
