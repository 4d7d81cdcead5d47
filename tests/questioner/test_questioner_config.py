"""The questioner on the shared config loader: a YAML file and ``--section.key=value`` work as
for every entry point, its earlier flags are aliases of the keys, the resolved config is kept
beside the output, and a banner says what the run does."""

import json
import typing

import yaml

from unigen.configuration import config_from_argv
from unigen.questioner.backends import BACKENDS
from unigen.questioner.cli import main
from unigen.questioner.config import QUESTIONER_FLAGS, BackendConfig, QuestionerConfig


def test_flags_are_aliases_of_keys():
    by_flags = config_from_argv(QuestionerConfig, [
        "--captions", "a.tsv", "b.tsv", "--out", "o.jsonl", "--backend", "http", "--endpoint",
        "http://x/v1", "--max-pairs", "2", "--no-progress", "--overwrite", "--prompt-version", "v2",
        "--trust-remote-code", "--input-format", "tsv"], QUESTIONER_FLAGS)
    by_keys = config_from_argv(QuestionerConfig, [
        "--captions=a.tsv,b.tsv", "--out=o.jsonl", "--backend.name=http",
        "--backend.endpoint=http://x/v1", "--filters.max_pairs=2", "--progress=false",
        "--overwrite=true", "--prompt.version=v2", "--backend.trust_remote_code=true",
        "--reader.input_format=tsv"])
    assert by_flags == by_keys
    assert by_flags.captions == ("a.tsv", "b.tsv") and by_flags.filters.max_pairs == 2
    # the backend names the loader accepts are the backends there are
    choices = typing.get_args(typing.get_type_hints(BackendConfig)["name"])[0]
    assert set(typing.get_args(choices)) == set(BACKENDS)


def test_a_config_file_runs_and_is_kept_beside_the_output(tmp_path, captions, capsys):
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(captions(12)) + "\n")
    out = tmp_path / "qa.jsonl"
    cfg = tmp_path / "q.yaml"
    cfg.write_text(yaml.safe_dump({"captions": [str(src)], "out": str(out), "progress": False,
                                   "backend": {"name": "rule"}, "filters": {"max_pairs": 2}}))
    assert main(["--config", str(cfg)]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith(f"[unigen.questioner] 1 caption file(s) → {out}: backend rule, "
                             f"prompt ccqa-v1, shard 0/1, up to 2 pair(s) per caption\n")
    kept = yaml.safe_load(open(f"{out}.config.yaml"))
    assert kept["backend"]["name"] == "rule" and kept["filters"]["max_pairs"] == 2
    assert json.loads(open(f"{out}.summary.json").read())["status"] == "complete"
    # an override on top of the file; the rerun resumes and says how much was done
    assert main(["--config", str(cfg), "--shard", "0/1"]) == 0
    assert "resuming, 12 captions done" in capsys.readouterr().out


def test_help_and_print_config(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--backend.name" in text and "--backend" in text and "--no-progress" in text
    assert main(["--captions", "x.txt", "--out", "o.jsonl", "--backend", "rule",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["backend"]["name"] == "rule" and printed["captions"] == ["x.txt"]
