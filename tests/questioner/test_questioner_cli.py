"""The rule-based backend end to end through the CLI, sharding, and bad input."""

import json
import re
import subprocess
import sys

import pytest

from unigen.questioner.cli import main
from unigen.questioner.filters import contains_span, normalize_tokens


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_cli(*args):
    return main([str(a) for a in args] + ["--no-progress"])


def test_rule_backend_end_to_end(tmp_path, captions, capsys):
    caps = captions(400)
    src = tmp_path / "cc3m.tsv"
    src.write_text("".join(f"{c}\thttp://example.com/{i}.jpg\n" for i, c in enumerate(caps)))
    out = tmp_path / "qa" / "ccqa.jsonl"
    assert run_cli("--captions", src, "--out", out, "--backend", "rule", "--max-pairs", "2") == 0

    rows = read_jsonl(out)
    assert rows and all(set(r) == {"key", "caption", "question", "answer"} for r in rows)
    by_key = {}
    for r in rows:
        idx = int(r["key"])
        assert r["key"] == f"{idx:09d}" and r["caption"] == caps[idx]
        assert contains_span(normalize_tokens(r["caption"]), normalize_tokens(r["answer"]))
        assert r["question"].endswith("?")
        by_key.setdefault(r["key"], []).append((r["question"], r["answer"]))
    assert all(len(v) <= 2 and len(set(v)) == len(v) for v in by_key.values())
    # Every 4th generated caption has nothing the rules can ask about.
    assert all(int(k) % 4 != 3 for k in by_key)
    assert len(by_key) == 300

    summary = json.loads((out.parent / "ccqa.jsonl.summary.json").read_text())
    total, this_run = summary["total"], summary["this_run"]
    assert summary["status"] == "complete"
    assert summary["run"]["prompt_version"] == "ccqa-v1"
    assert total["captions"] == 400 and total["pairs_kept"] == len(rows)
    assert total["captions_with_pairs"] == 300
    assert sum(total["pairs_per_caption"].values()) == 400
    assert sum(int(k) * v for k, v in total["pairs_per_caption"].items()) == len(rows)
    assert total["rejected"]["empty_generation"] == 100
    assert this_run["records_read"] == 400 and this_run["captions_generated"] == 400
    assert "400 captions" in capsys.readouterr().out

    # Running again is a resume with nothing left to do.
    assert run_cli("--captions", src, "--out", out, "--backend", "rule", "--max-pairs", "2") == 0
    assert read_jsonl(out) == rows
    again = json.loads((out.parent / "ccqa.jsonl.summary.json").read_text())
    assert again["this_run"]["already_done"] == 400 and again["this_run"]["captions_generated"] == 0
    assert again["total"] == total


def test_shards_partition_the_keys(tmp_path, captions):
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(captions(200)) + "\n")
    full = tmp_path / "full.jsonl"
    assert run_cli("--captions", src, "--out", full, "--backend", "rule") == 0
    parts = []
    for i in range(3):
        out = tmp_path / f"part{i}.jsonl"
        assert run_cli("--captions", src, "--out", out, "--backend", "rule", "--shard", f"{i}/3") == 0
        parts.append(read_jsonl(out))
        summary = json.loads((tmp_path / f"part{i}.jsonl.summary.json").read_text())
        assert summary["this_run"]["other_shard"] + summary["total"]["captions"] == 200
    keys = [{r["key"] for r in p} for p in parts]
    assert all(keys) and not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    merged = sorted((r for p in parts for r in p), key=lambda r: (r["key"], r["question"]))
    assert merged == sorted(read_jsonl(full), key=lambda r: (r["key"], r["question"]))
    # A shard's output cannot be resumed as another shard.
    assert run_cli("--captions", src, "--out", tmp_path / "part0.jsonl", "--backend", "rule", "--shard", "1/3") == 2


def test_bad_lines_are_skipped_and_counted(tmp_path, capsys):
    src = tmp_path / "caps.jsonl"
    src.write_text(
        '{"key": "a", "caption": "a man sits on a bench."}\n'
        "{not json\n"
        '{"key": "a", "caption": "a man sits on a bench."}\n'
        '{"key": "b", "caption": ""}\n'
        '{"key": "c", "caption": "two dogs in the snow"}\n'
    )
    out = tmp_path / "out.jsonl"
    # With the progress bar on: bad-line messages go through it, and it must not break the run.
    assert main(["--captions", str(src), "--out", str(out), "--backend", "rule"]) == 0
    assert {r["key"] for r in read_jsonl(out)} == {"a", "c"}
    err = capsys.readouterr().err
    assert "caps.jsonl:2: invalid_json" in err and "caps.jsonl:4: empty_caption" in err
    this_run = json.loads((tmp_path / "out.jsonl.summary.json").read_text())["this_run"]
    assert this_run["bad_lines"] == {"empty_caption": 1, "invalid_json": 1}
    assert this_run["duplicate_keys"] == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--captions", "{tmp}/missing.txt"], "cannot read .*missing.txt"),
        (["--captions", "{tmp}/nomatch-*.tar"], "no file matches"),
        (["--backend", "hf", "--model", "{tmp}/no-model"], "--model: .*no-model is not a directory"),
        (["--backend", "hf", "--model", "{tmp}"], "has no config.json"),
        (["--backend", "vllm"], "--model is required for --backend vllm"),
        (["--backend", "http"], "--endpoint is required"),
        (["--backend", "http", "--endpoint", "ftp://x"], "--endpoint must be an http"),
        (["--shard", "3/2"], "--shard 3/2"),
        (["--shard", "x"], "--shard must look like i/n"),
        (["--max-pairs", "0"], "--max-pairs"),
        (["--out", "{tmp}/caps.txt"], "--out .* is also one of the --captions inputs"),
        (["--backend", "hf", "--model", "{tmp}", "--dtype", "int3"], "has no config.json"),
        (["--backend", "http", "--endpoint", "http://127.0.0.1:9/v1", "--concurrency", "0"], "--concurrency"),
        (["--batch-size", "0"], "--batch-size"),
        (["--instruction", "Ask."], "--prompt-version"),
        (["--prompt", "{tmp}/p.yaml"], "--prompt: cannot read"),
    ],
)
def test_bad_arguments_exit_2_with_a_named_error(tmp_path, capsys, extra, message):
    src = tmp_path / "caps.txt"
    src.write_text("a man on a bench\n")
    args = {"--captions": str(src), "--out": str(tmp_path / "o.jsonl"), "--backend": "rule"}
    extra = [e.format(tmp=tmp_path) for e in extra]
    for i in range(0, len(extra), 2):
        args[extra[i]] = extra[i + 1]
    argv = [x for kv in args.items() for x in kv]
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    # one line, in the shared format of every entry point
    assert err.startswith("unigen.questioner: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    # Bad arguments are found before the output (or its ledger) is created.
    assert list(tmp_path.iterdir()) == [src]


def test_unknown_backend_is_rejected_by_the_module_entry_point(tmp_path):
    src = tmp_path / "caps.txt"
    src.write_text("a man on a bench\n")
    proc = subprocess.run(
        [sys.executable, "-m", "unigen.questioner", "--captions", str(src), "--out", str(tmp_path / "o.jsonl"),
         "--backend", "llama"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    # the flag --backend is the key backend.name of the shared config loader
    assert "unigen.questioner: error: bad value 'llama' for 'backend.name'" in proc.stderr
    assert "'rule'" in proc.stderr


def test_print_prompt(capsys):
    assert main(["--print-prompt", "a dog.", "--instruction", "Ask.", "--prompt-version", "v9"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Ask.\n<sentence> a worker") and out.rstrip("\n").endswith("<sentence> a dog. <question>")


def test_required_arguments(capsys):
    assert main(["--captions", "x.txt"]) == 2
    assert "required: --out, --backend" in capsys.readouterr().err


def test_webdataset_shards_keep_their_sample_keys(tmp_path):
    import io
    import tarfile

    shards = []
    for s, samples in enumerate([["a man sits on a bench.", "two cats on a sofa"], ["a red boat in the harbour"]]):
        path = tmp_path / f"cc3m-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, caption in enumerate(samples):
                for ext, data in (("jpg", b"\xff\xd8\xff"), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(path)
    out = tmp_path / "out.jsonl"
    assert run_cli("--captions", str(tmp_path / "cc3m-*.tar"), "--out", out, "--backend", "rule") == 0
    assert [(r["key"], r["answer"]) for r in read_jsonl(out)] == [
        ("000000000", "bench"), ("000000001", "sofa"), ("000010000", "harbour")
    ]
