"""The HF backend with a tiny randomly initialised GPT-2: its garbage is rejected, the run completes."""

import json

import pytest

from unigen.questioner import Failure, GenerationSettings, UsageError
from unigen.questioner.backends.hf import HFBackend
from unigen.questioner.cli import main
from unigen.questioner.prompt import PromptTemplate


def test_random_model_run_completes_and_garbage_is_rejected(tmp_path, tiny_model_dir, captions):
    src = tmp_path / "caps.jsonl"
    caps = captions(12)
    src.write_text("".join(json.dumps({"key": f"img{i}", "caption": c}) + "\n" for i, c in enumerate(caps)))
    out = tmp_path / "out.jsonl"
    argv = ["--captions", str(src), "--out", str(out), "--backend", "hf", "--model", str(tiny_model_dir),
            "--batch-size", "4", "--max-new-tokens", "12", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    total = summary["total"]
    assert summary["status"] == "complete" and summary["run"]["backend"] == "hf"
    assert total["captions"] == 12
    # A random model writes no valid pair: every caption is recorded, with its rejections counted.
    assert total["pairs_kept"] == 0 and out.read_text() == ""
    assert set(total["rejected"]) <= {"malformed", "empty_generation", "not_a_question", "answer_not_in_caption",
                                      "empty_question_or_answer", "yes_no", "answer_too_long"}
    ledger = [json.loads(l) for l in (tmp_path / "out.jsonl.done.jsonl").read_text().splitlines()[1:]]
    assert sorted(r["key"] for r in ledger) == sorted(f"img{i}" for i in range(12))
    assert all(r["kept"] + sum(r["rejected"].values()) >= 1 for r in ledger)
    kept = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(kept) == total["pairs_kept"]


def test_generate_keeps_order_and_stops_at_the_sentence_tag(tiny_model_dir, captions):
    backend = HFBackend(str(tiny_model_dir), settings=GenerationSettings(max_new_tokens=8), device="cpu")
    caps = captions(5)
    prompts = [PromptTemplate().render(c) for c in caps]
    batched = backend.generate(prompts, caps)
    # Left padding: a prompt's greedy continuation must not depend on its batch neighbours.
    single = [backend.generate([p], [c])[0] for p, c in zip(prompts, caps)]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_generate_passes_stop_string_and_decoding_settings(tiny_model_dir, monkeypatch):
    backend = HFBackend(str(tiny_model_dir), settings=GenerationSettings(max_new_tokens=5), device="cpu")
    seen = {}
    original = backend.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(backend.model, "generate", spy)
    backend.generate([PromptTemplate().render("a dog.")], ["a dog."])
    assert seen["stop_strings"] == ["<sentence>"] and seen["tokenizer"] is backend.tokenizer
    assert seen["max_new_tokens"] == 5 and seen["do_sample"] is False
    assert backend.tokenizer.padding_side == "left"


def test_prompt_longer_than_the_context_is_a_permanent_failure(tiny_model_dir):
    backend = HFBackend(str(tiny_model_dir), settings=GenerationSettings(max_new_tokens=8), device="cpu")
    long_caption = "a man sits on a bench " * 200
    short_caption = "a man sits on a bench"
    results = backend.generate(
        [PromptTemplate().render(long_caption), PromptTemplate().render(short_caption)], [long_caption, short_caption]
    )
    assert isinstance(results[0], Failure) and not results[0].retryable and results[0].reason == "prompt_too_long"
    assert isinstance(results[1], str)


def test_model_directory_checks(tmp_path):
    with pytest.raises(UsageError, match="--model is required"):
        HFBackend(None)
    with pytest.raises(UsageError, match="not a directory"):
        HFBackend(str(tmp_path / "absent"))
    with pytest.raises(UsageError, match="no config.json"):
        HFBackend(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="cannot load a causal LM"):
        HFBackend(str(tmp_path), device="cpu")


def test_bad_dtype(tiny_model_dir):
    with pytest.raises(UsageError, match="--dtype"):
        HFBackend(str(tiny_model_dir), dtype="int3")


@pytest.mark.gpu
def test_cuda_runs_in_bfloat16(tiny_model_dir, captions):
    import torch

    backend = HFBackend(str(tiny_model_dir), settings=GenerationSettings(max_new_tokens=8))
    assert backend.device.type == "cuda" and backend.model.dtype == torch.bfloat16
    caps = captions(6)
    results = backend.generate([PromptTemplate().render(c) for c in caps], caps)
    assert len(results) == 6 and all(isinstance(t, str) for t in results)
