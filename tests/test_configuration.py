import enum
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from unigen.configuration import (
    ConfigError,
    apply_overrides,
    config_from_argv,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


class Precision(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass(kw_only=True)
class Optim:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 2000
    schedule: Literal["linear", "cosine"] = "linear"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(kw_only=True)
class Data:
    paths: tuple[str, ...] = ()
    ratios: dict[str, float] = field(default_factory=lambda: {"trans": 1.0, "cap": 1.0})
    min_score: Optional[float] = 1.04
    languages: list[str] | None = None
    shuffle: bool = True


@dataclass(kw_only=True)
class Train:
    name: str = "run"
    steps: int = 100
    precision: Precision = Precision.bf16
    optim: Optim = field(default_factory=Optim)
    data: Data = field(default_factory=Data)


def test_defaults_and_typed_overrides():
    cfg = load_config(Train, overrides=[
        "--steps=500", "--optim.lr=3e-4", "--optim.betas=0.8,0.95", "--optim.schedule=cosine",
        "--data.paths=[a.tsv, b.tsv]", "--data.min_score=none", "--data.shuffle=false",
        "--data.ratios.cap=0.5", "--data.languages=de,fr", "--precision=fp32", "--name", "007"])
    assert cfg.steps == 500 and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.schedule == "cosine" and cfg.data.paths == ("a.tsv", "b.tsv")
    assert cfg.data.min_score is None and cfg.data.shuffle is False
    assert cfg.data.ratios == {"trans": 1.0, "cap": 0.5}  # one key changed, the rest kept
    assert cfg.data.languages == ["de", "fr"] and cfg.precision is Precision.fp32
    assert cfg.name == "007"  # strings are taken literally
    assert cfg.optim.warmup_steps == 2000


@pytest.mark.parametrize("override, message", [
    ("--stpes=5", r"unknown config key 'stpes' \(did you mean 'steps'\?\); valid keys in "
                  r"Train: data, name, optim, precision, steps"),
    ("--optim.learning_rate=1", r"unknown config key 'optim.learning_rate'.*valid keys in "
                                r"'optim': betas, lr, schedule, warmup_steps"),
    ("--steps=ten", r"bad value 'ten' for 'steps': expected int"),
    ("--steps=1.5", r"expected int"),
    ("--optim.lr=fast", r"bad value 'fast' for 'optim.lr': expected float"),
    ("--data.shuffle=maybe", r"for 'data.shuffle': expected bool"),
    ("--optim.schedule=step", r"expected one of 'linear', 'cosine'"),
    ("--precision=fp8", r"expected one of 'fp32', 'bf16'"),
    ("--optim.betas=0.9", r"of length 2, got 1 items"),
    ("--optim.betas=0.9,x", r"'optim.betas\[1\]': expected float"),
    ("--optim=1", r"'optim' is a section"),
    ("--steps.x=1", r"'steps' is a int value, it has no key 'x'"),
    ("--data.ratios.cap=lots", r"'data.ratios.cap': expected float"),
    ("--optim.lr=-1", r"lr must be positive"),  # __post_init__ runs on resolved values
    ("steps=5", r"expected an override '--section.key=value'"),
    ("--steps", r"has no value"),
])
def test_bad_overrides_fail_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Train, overrides=[override])


def test_yaml_file_then_overrides_and_file_errors(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("steps: 7\noptim:\n  lr: 0.001\ndata:\n  ratios: {trans: 2, cap: 1}\n")
    cfg = load_config(Train, p, ["--optim.lr=0.002"])
    assert cfg.steps == 7 and cfg.optim.lr == 0.002 and cfg.data.ratios == {"trans": 2.0,
                                                                            "cap": 1.0}
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lrr'"):
        load_config(Train, bad)
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'optim.lrr'"):
        load_config(Train, bad, ["--steps=3"])
    typed = tmp_path / "typed.yaml"
    typed.write_text("steps: '12'\nname: 5\n")
    with pytest.raises(ConfigError, match=r"bad value 5 for 'name': expected str"):
        load_config(Train, typed)
    # a file that is incomplete or invalid on its own may be completed by overrides
    low = tmp_path / "low.yaml"
    low.write_text("optim:\n  lr: -1\n")
    assert load_config(Train, low, ["--optim.lr=0.1"]).optim.lr == 0.1
    with pytest.raises(ConfigError, match="low.yaml: optim: lr must be positive") as info:
        load_config(Train, low)
    assert info.value.kind == "invalid"
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Train, lst)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(Train, tmp_path / "missing.yaml")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_then_load_round_trips(tmp_path, suffix):
    cfg = load_config(Train, overrides=["--precision=fp32", "--data.paths=x,y",
                                        "--optim.betas=0.5,0.6"])
    path = save_config(cfg, tmp_path / f"resolved{suffix}")
    text = open(path).read()
    data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    assert data["precision"] == "fp32" and data["data"]["paths"] == ["x", "y"]
    assert load_config(Train, path) == cfg
    with pytest.raises(ValueError, match=r"\.yaml, \.yml or \.json"):
        save_config(cfg, tmp_path / "resolved.toml")


def test_dict_round_trip_and_argv():
    cfg = Train(steps=3)
    assert config_from_dict(Train, config_to_dict(cfg)) == cfg
    cfg2 = config_from_argv(Train, ["--steps=4", "--data.shuffle", "no"])
    assert cfg2.steps == 4 and cfg2.data.shuffle is False
    assert apply_overrides(Train, {}, ["--optim.lr=1"]) == {"optim": {"lr": 1.0}}
    with pytest.raises(ConfigError, match="--config needs a file name"):
        config_from_argv(Train, ["--config"])


def test_required_fields_are_reported():
    @dataclass(kw_only=True)
    class Needs:
        path: str
        n: int = 1

    with pytest.raises(ConfigError, match="missing required key"):
        load_config(Needs)
    assert load_config(Needs, overrides=["--path=x"]).path == "x"


def test_a_section_keeps_the_defaults_of_its_enclosing_field(tmp_path):
    """A recipe may declare a section with other defaults than the section class's own (e.g.
    fine-tuning's lr); setting one key of it, from a file or an override, keeps the others."""

    @dataclass(kw_only=True)
    class Recipe:
        optim: Optim = field(default_factory=lambda: Optim(lr=3e-5, warmup_steps=0))

    cfg = load_config(Recipe, overrides=["--optim.schedule=cosine"])
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == (3e-5, 0, "cosine")
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  betas: [0.8, 0.9]\n")
    cfg = load_config(Recipe, path)
    assert (cfg.optim.lr, cfg.optim.betas) == (3e-5, (0.8, 0.9))
    assert load_config(Recipe).optim.lr == 3e-5


@dataclass(kw_only=True)
class Net:
    width: int = 768
    depth: int = 12

    @classmethod
    def config_presets(cls):
        return {"paper": cls, "tiny": lambda: cls(width=32, depth=2)}


@dataclass(kw_only=True)
class WithNet:
    net: Net = field(default_factory=Net)
    lr: float = 1e-4


def test_a_section_may_be_a_preset_name_with_changes(tmp_path):
    assert load_config(WithNet, overrides=["--net=tiny"]).net == Net(width=32, depth=2)
    assert load_config(WithNet, overrides=["--net.preset=tiny"]).net == Net(width=32, depth=2)
    # later field overrides change the preset, in either order
    for args in (["--net=tiny", "--net.depth=3"], ["--net.depth=3", "--net=tiny"]):
        assert load_config(WithNet, overrides=args).net == Net(width=32, depth=3)
    (tmp_path / "a.yaml").write_text("net: tiny\n")
    assert load_config(WithNet, tmp_path / "a.yaml", ["--net.width=64"]).net == Net(width=64, depth=2)
    (tmp_path / "b.yaml").write_text("net:\n  preset: tiny\n  depth: 5\n")
    assert load_config(WithNet, tmp_path / "b.yaml").net == Net(width=32, depth=5)
    with pytest.raises(ConfigError, match="bad value 'huge' for 'net': expected one of paper, tiny"):
        load_config(WithNet, overrides=["--net=huge"])
    with pytest.raises(ConfigError, match="'net.preset': expected one of paper, tiny"):
        config_from_dict(WithNet, {"net": {"preset": "big"}})
    # a section without presets takes no name
    with pytest.raises(ConfigError, match="'optim' is a section"):
        load_config(Train, overrides=["--optim=fast"])


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, capsys):
    from unigen.configuration import run_cli

    ran = []
    assert run_cli(WithNet, ran.append, ["--net=tiny", "--lr=0.5", "--print-config"],
                   prog="prog") == 0
    assert ran == [] and yaml.safe_load(capsys.readouterr().out) == {
        "net": {"width": 32, "depth": 2}, "lr": 0.5}
    assert run_cli(WithNet, ran.append, ["--net=tiny"], prog="prog") == 0
    assert ran == [WithNet(net=Net(width=32, depth=2))]
    assert run_cli(WithNet, ran.append, ["--help"], prog="prog") == 0
    assert "net.*  Or a preset: --net=paper|tiny." in capsys.readouterr().out


def test_the_model_presets_of_the_entry_points(capsys):
    from unigen.model.config import UniGenConfig
    from unigen.train import main

    assert main(["--model=tiny", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert UniGenConfig.from_dict(printed["model"]) == UniGenConfig.tiny()
    # the data pipeline's sizes follow the model's unless set
    assert printed["data"]["image_size"] == 32 and printed["data"]["max_encoder_len"] == 16
    assert main(["--model=paper", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["image_size"] == 224 and printed["data"]["max_encoder_len"] == 40
