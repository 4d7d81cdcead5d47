"""The demos run end to end on tiny settings and write what they promise."""

import json
import os

import pytest
import yaml

TINY = ["--steps", "12", "--images", "60", "--text-pairs", "40", "--eval-images", "10",
        "--batch-size", "12", "--clip-steps", "5"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_demo_smoke(tmp_path, capsys):
    from unigen.demo.pretrain import main

    out = tmp_path / "demo"
    # what an earlier demo leaves: the trainer would refuse these run directories (they hold
    # checkpoints), so a second `make demo` must replace them
    stale = out / "seed0" / "unigen" / "checkpoints" / "step_00000005"
    stale.mkdir(parents=True)
    (stale / "marker").write_text("from an earlier run")
    assert main(["--out", str(out), "--seeds", "0,1", *TINY]) == 0
    assert not stale.exists()
    printed = capsys.readouterr().out
    assert "ablation: no translation pairs" in printed and "| sw | **no** |" in printed
    assert "tiny CLIP: 5 steps" in printed and " ± " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1]
    for setting in ("unigen", "no_translation"):
        for seed in ("0", "1"):
            langs = [row["language"] for row in results["scores"][setting][seed]]
            assert langs == ["en", "de", "fr", "ja", "es", "sw"]
            assert os.path.isdir(out / f"seed{seed}" / setting / "final_model")
        assert set(results["final_losses"][setting]) >= {"loss/cap", "loss/match"}
    assert "loss/trans" in results["final_losses"]["unigen"]
    assert "loss/trans" not in results["final_losses"]["no_translation"]
    # the ablation differs in the translation pairs only: UniGen's batch is the ablation's 12
    # image-task samples plus 4 translation pairs
    configs = {s: yaml.safe_load((out / "seed0" / s / "train.yaml").read_text())
               for s in ("unigen", "no_translation")}
    assert configs["no_translation"]["data"]["wikimatrix"] == []
    assert "trans" not in configs["no_translation"]["data"]["ratios"]
    assert configs["unigen"]["data"]["batch_size"] == 16
    assert configs["no_translation"]["data"]["batch_size"] == 12
    assert configs["unigen"]["data"]["ratios"]["trans"] == 1.0
    for cfg in configs.values():
        del cfg["data"]["wikimatrix"], cfg["run"]["output_dir"], cfg["data"]["batch_size"]
        cfg["data"]["ratios"].pop("trans", None)
    assert configs["unigen"] == configs["no_translation"]
    assert configs["unigen"]["init"]["clip_dir"] == str(out / "clip" / "model")
    assert configs["unigen"]["model"]["vision"]["frozen"] is True
    for png in ("loss_curves.png", "recall.png"):
        assert (out / png).stat().st_size > 1000
    assert 0.0 < results["qa_chance"] < 1.0
    assert yaml.safe_load((out / "demo.yaml").read_text())["steps"] == 12  # the resolved config


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ablations_demo_smoke(tmp_path, capsys):
    from unigen.demo.ablations import ROWS, main

    out = tmp_path / "abl"
    assert main(["--out", str(out), "--seeds", "0,1", *TINY]) == 0
    printed = capsys.readouterr().out
    for _, name, _ in ROWS:
        assert f"| {name} |" in printed
    assert "-w/o CCQA3M+CC6L+CL | 67.38 | 40.31" in printed  # the paper's row, quoted
    results = json.loads((out / "results.json").read_text())
    assert len(results["verdicts"]) == 3 * (len(ROWS) - 1)
    no_cl = yaml.safe_load((out / "seed0" / "no_ccqa_cc6l_cl" / "train.yaml").read_text())
    assert no_cl["model"]["loss"]["contrastive_weight"] == 0.0
    assert no_cl["data"]["ccqa"] == [] and no_cl["data"]["cc6l"] == []
    assert (out / "table2.md").read_text().count("\n|") > 10


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "demo.steps must be an int >= 1, got 0"),
    (["--contrastive-weight", "-1"], "demo.contrastive_weight must be a finite number >= 0.0, got -1.0"),
    (["--multilingual-fraction", "2"], "demo.multilingual_fraction must be a finite number >= 0.0 and <= 1.0, got 2.0"),
    (["--lr", "0"], "demo.lr must be a finite number > 0.0, got 0.0"),
    (["--stpes", "5"], "did you mean 'steps'"),
    (["--seeds", "1,1"], "demo.seeds must be distinct"),
    (["--clip-steps", "0"], "demo.clip_steps must be an int >= 1, got 0"),
    (["--trans-ratio", "inf"], "demo.trans_ratio must be a finite number >= 0.0, got inf"),
])
def test_pretrain_demo_rejects_bad_arguments(argv, message, capsys):
    from unigen.demo.pretrain import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_fused_loss_demo(capsys):
    from unigen.demo.fused_loss import main

    main(["--steps", "2", "--tokens", "64", "--vocab", "300", "--dim", "16"])
    printed = capsys.readouterr().out
    assert "naive loss" in printed and "largest loss difference" in printed
