"""The config presets by name (``--config tiny``), and the README's path (``--config
configs/tiny.yaml``) from folders other than the checkout's root."""

import os

import pytest

from unigen.configuration import load_config, read_config_file
from unigen.presets import find_preset, preset_names
from unigen.pretraining import PretrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_preset_is_found_by_name():
    names = preset_names()
    assert {"tiny", "paper", "ablations/no_ccqa"} <= set(names)
    for name in names:
        path = find_preset(name)
        assert path is not None and os.path.isfile(path)
        assert find_preset(f"configs/{name}.yaml") == path == find_preset(f"{name}.yaml")
        read_config_file(path)  # extends resolved relative to the preset file


def test_a_file_that_exists_wins_and_bad_names_are_none(tmp_path, monkeypatch):
    own = tmp_path / "tiny.yaml"
    own.write_text("schedule: {steps: 7, warmup_steps: 0}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(PretrainConfig, "tiny.yaml").schedule.steps == 7  # the local file
    assert load_config(PretrainConfig, "tiny").schedule.steps == 800     # the preset
    assert load_config(PretrainConfig, "configs/tiny.yaml").schedule.steps == 800
    for bad in ("nope", "../configs/tiny", "/abs/tiny", ""):
        assert find_preset(bad) is None


def test_an_unknown_config_names_the_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config file 'tinny' does not exist and is no "
                                                r"preset \(ablations/cc6l_10, .*tiny\)"):
        load_config(PretrainConfig, "tinny")
