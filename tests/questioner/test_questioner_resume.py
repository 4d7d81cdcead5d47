"""Resume after an interrupted run: no duplicate key, no missing key, no half line."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from unigen.questioner import OutputStore, UsageError
from unigen.questioner.backends.rule import RuleBackend
from unigen.questioner.cli import main
from unigen.questioner.writer import ledger_path, signals_deferred


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def cli(src, out, *extra):
    return main(["--captions", str(src), "--out", str(out), "--backend", "rule", "--batch-size", "16",
                 "--max-pairs", "3", "--no-progress", *extra])


@pytest.fixture
def source(tmp_path, captions):
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(captions(300, seed=3)) + "\n")
    ref = tmp_path / "reference.jsonl"
    assert cli(src, ref) == 0
    return src, rows(ref)


def _interrupt_after(monkeypatch, n_batches):
    calls = {"n": 0}
    original = RuleBackend.generate

    def generate(self, prompts, caps):
        calls["n"] += 1
        if calls["n"] > n_batches:
            raise KeyboardInterrupt
        return original(self, prompts, caps)

    monkeypatch.setattr(RuleBackend, "generate", generate)


def _assert_same_as_reference(out, reference):
    got = rows(out)
    def counts(rs):
        return Counter(json.dumps(r, sort_keys=True) for r in rs)

    assert counts(got) == counts(reference)
    assert out.read_bytes().endswith(b"\n")


def test_interrupted_run_resumes_without_duplicates_or_gaps(tmp_path, source, monkeypatch, capsys):
    src, reference = source
    out = tmp_path / "out.jsonl"
    _interrupt_after(monkeypatch, 5)
    assert cli(src, out) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    partial = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert partial["status"] == "interrupted" and partial["total"]["captions"] == 5 * 16
    monkeypatch.undo()

    assert cli(src, out) == 0
    _assert_same_as_reference(out, reference)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["this_run"]["already_done"] == 80
    assert summary["total"]["captions"] == 300 and summary["total"]["pairs_kept"] == len(reference)


def test_killed_mid_write_tail_is_repaired(tmp_path, source, monkeypatch):
    """A kill between the output write and the ledger write, and one in the middle of a line."""
    src, reference = source
    out = tmp_path / "out.jsonl"
    _interrupt_after(monkeypatch, 3)
    assert cli(src, out) == 130
    monkeypatch.undo()
    done = {json.loads(l)["key"] for l in ledger_path(out).read_text().splitlines()[1:]}
    # The next batch made it to OUT but not to the ledger, and the write after it was cut short.
    unrecorded = [r for r in reference if r["key"] not in done][:7]
    with open(out, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in unrecorded))
        f.write('{"key": "000000299", "caption": "half a li')
    with open(ledger_path(out), "a") as f:
        f.write('{"key": "0000')

    assert cli(src, out) == 0
    _assert_same_as_reference(out, reference)
    ledger_keys = [json.loads(l)["key"] for l in ledger_path(out).read_text().splitlines()[1:]]
    assert len(ledger_keys) == len(set(ledger_keys)) == 300


def test_overwrite_starts_over(tmp_path, source):
    src, reference = source
    out = tmp_path / "out.jsonl"
    out.write_text('{"key": "stale", "caption": "c", "question": "q?", "answer": "c"}\n')
    assert cli(src, out) == 2  # an output without a ledger is not trusted
    assert cli(src, out, "--overwrite") == 0
    _assert_same_as_reference(out, reference)


def test_store_refuses_inconsistent_or_locked_outputs(tmp_path):
    out = tmp_path / "o.jsonl"
    header = {"backend": "rule", "shard": "0/1"}
    with OutputStore(out, run_header=header) as store:
        store.append([("k1", "a cap", [("What?", "cap")], Counter()), ("k2", "b", [], Counter({"malformed": 1}))])
        with pytest.raises(UsageError, match="another questioner run is writing"):
            OutputStore(out, run_header=header).open()
    with OutputStore(out, run_header={**header, "backend": "hf"}) as store:
        assert store.done == {"k1", "k2"} and store.totals.kept == 1
        assert store.totals.rejected == {"malformed": 1}
        assert any("backend='rule'" in w for w in store.warnings)
    out.write_text("")  # pairs the ledger vouches for are gone
    with pytest.raises(UsageError, match="out of sync"):
        OutputStore(out, run_header=header).open()


def test_deferred_signal_arrives_after_the_write():
    reached = False
    # Python's own Ctrl-C handler, whatever an earlier test (or library) left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # a handler would have run by now if the signal were not held
                reached = True
    finally:
        signal.signal(signal.SIGINT, previous)
    assert reached


def test_sigterm_mid_run_then_resume(tmp_path, http_server, completion, captions):
    """A real process, stopped by SIGTERM while generating, then restarted: exactly one copy of each pair."""

    def behaviour(state, path, body):
        return 200, {"choices": [{"text": completion(body["prompt"])}]}, 0.03

    url, state = http_server(behaviour)
    caps = captions(80, seed=5)
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(caps) + "\n")
    out = tmp_path / "out.jsonl"
    argv = [sys.executable, "-m", "unigen.questioner", "--captions", str(src), "--out", str(out),
            "--backend", "http", "--endpoint", url, "--concurrency", "1", "--batch-size", "4",
            "--max-pairs", "3", "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ledger = ledger_path(out)
            if ledger.exists() and len(ledger.read_text().splitlines()) > 8:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["status"] == "interrupted" and 8 <= summary["total"]["captions"] < 80
    assert out.read_bytes().endswith(b"\n")

    done_before = summary["total"]["captions"]
    n_requests = len(state.requests)
    rerun = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert len(state.requests) - n_requests == 80 - done_before  # only the unrecorded captions
    reference = tmp_path / "reference.jsonl"
    assert cli(src, reference) == 0
    _assert_same_as_reference(out, rows(reference))


def test_corrupt_ledger_is_refused_with_its_name(tmp_path, source):
    src, _ = source
    out = tmp_path / "out.jsonl"
    assert cli(src, out) == 0
    lines = ledger_path(out).read_text().splitlines(keepends=True)
    lines[5] = '{"key": "000000004"}\n'  # a complete line that is not a ledger record
    ledger_path(out).write_text("".join(lines))
    with pytest.raises(UsageError, match=r"out.jsonl.done.jsonl line 6 is not a ledger record"):
        OutputStore(out, run_header={"backend": "rule", "shard": "0/1"}).open()


def test_summary_counts_the_batch_being_written_when_a_signal_arrives(tmp_path, captions, monkeypatch):
    """Ctrl-C during a batch's write is held until the write is done; the summary printed then
    counts that batch (it was one batch behind the files before)."""
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(captions(80, seed=7)) + "\n")
    out = tmp_path / "out.jsonl"
    writes = {"n": 0}
    original = OutputStore._write_lines

    def write_then_interrupt(f, lines):
        original(f, lines)
        writes["n"] += 1
        if writes["n"] == 5:  # the output lines of the third batch
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(OutputStore, "_write_lines", staticmethod(write_then_interrupt))
    # Ctrl-C as a terminal delivers it, whatever handler an earlier test left installed
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert cli(src, out) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    ledger = [r for r in rows(ledger_path(out)) if "key" in r]  # the first line is the header
    assert 0 < len(ledger) < 80 and len(ledger) % 16 == 0
    assert summary["total"]["captions"] == len(ledger) == summary["this_run"]["captions_generated"]
    assert summary["total"]["pairs_kept"] == len(rows(out)) == summary["this_run"]["pairs_kept"]
