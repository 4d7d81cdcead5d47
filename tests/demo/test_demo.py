"""The demos run end to end on tiny settings and write what they promise."""

import json
import os

import pytest
import yaml


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretrain_demo_smoke(tmp_path, capsys):
    from unigen.demo.pretrain import main

    out = tmp_path / "demo"
    # what an earlier demo leaves: the trainer would refuse these run directories (they hold
    # checkpoints), so a second `make demo` must replace them
    stale = out / "unigen" / "checkpoints" / "step_00000005"
    stale.mkdir(parents=True)
    (stale / "marker").write_text("from an earlier run")
    assert main(["--out", str(out), "--steps", "12", "--images", "60", "--text-pairs", "40",
                 "--eval-images", "10", "--batch-size", "12"]) == 0
    assert not stale.exists()
    printed = capsys.readouterr().out
    assert "ablation: no translation pairs" in printed and "| sw | **no** |" in printed
    results = json.loads((out / "results.json").read_text())
    for run in ("unigen", "no_translation"):
        langs = [row["language"] for row in results[run]]
        assert langs == ["en", "de", "fr", "ja", "es", "sw"]
        assert os.path.isdir(out / run / "final_model")
    assert (out / "loss_curves.png").stat().st_size > 1000
    assert 0.0 < results["qa_chance"] < 1.0
    assert yaml.safe_load((out / "demo.yaml").read_text())["steps"] == 12  # the resolved config


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "steps must be positive"),
    (["--contrastive-weight", "-1"], "contrastive_weight must be a finite non-negative"),
    (["--multilingual-fraction", "2"], "multilingual_fraction must be in"),
    (["--lr", "0"], "lr must be a finite positive"),
    (["--stpes", "5"], "did you mean 'steps'"),
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
