"""The vLLM backend: a clear error where vLLM is absent; its adapter logic against a stand-in module.

vLLM cannot be installed on CPU CI, so the stand-in below records what the backend asks of the
``vllm.LLM`` / ``vllm.SamplingParams`` API and answers like vLLM does (one RequestOutput per
prompt, in order; a ValueError for the whole batch when one prompt exceeds the context).
"""

import sys
import types
from dataclasses import dataclass

import pytest

from unigen.questioner import Failure, GenerationSettings, UsageError
from unigen.questioner.backends.vllm import VLLMBackend
from unigen.questioner.cli import main


@pytest.fixture
def model_dir(tmp_path):
    # The backend only checks that the directory is a model directory; vLLM itself is faked.
    path = tmp_path / "llama"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_missing_vllm_is_a_clear_error(tmp_path, monkeypatch, model_dir, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` raise ImportError
    with pytest.raises(UsageError, match="--backend vllm needs vLLM, which is not installed"):
        VLLMBackend(str(model_dir))
    src = tmp_path / "caps.txt"
    src.write_text("a man sits on a bench.\n")
    rc = main(["--captions", str(src), "--out", str(tmp_path / "o.jsonl"), "--backend", "vllm",
               "--model", str(model_dir), "--no-progress"])
    assert rc == 2 and "pip install vllm" in capsys.readouterr().err


@dataclass
class _Completion:
    text: str


@dataclass
class _RequestOutput:
    outputs: list


def _fake_vllm(max_prompt_chars=10_000):
    calls = {"llm": None, "sampling": None, "generate": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            calls["sampling"] = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def generate(self, prompts, sampling, use_tqdm=True):
            calls["generate"].append(list(prompts))
            if any(len(p) > max_prompt_chars for p in prompts):
                raise ValueError("The decoder prompt (length 9000) is longer than the maximum model length of 2048.")
            return [_RequestOutput([_Completion(f"answer to {p[-12:]}")]) for p in prompts]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module, calls


def test_adapter_builds_engine_and_keeps_order(monkeypatch, model_dir):
    module, calls = _fake_vllm()
    monkeypatch.setitem(sys.modules, "vllm", module)
    backend = VLLMBackend(str(model_dir), settings=GenerationSettings(max_new_tokens=9), tensor_parallel_size=2)
    assert calls["llm"]["model"] == str(model_dir) and calls["llm"]["dtype"] == "bfloat16"
    assert calls["llm"]["tensor_parallel_size"] == 2 and calls["llm"]["enable_prefix_caching"] is True
    assert calls["sampling"]["stop"] == ["<sentence>"] and calls["sampling"]["max_tokens"] == 9
    assert calls["sampling"]["temperature"] == 0.0
    prompts = [f"prompt number {i:03d}" for i in range(5)]
    assert backend.generate(prompts, ["c"] * 5) == [f"answer to {p[-12:]}" for p in prompts]
    assert backend.describe() == {"backend": "vllm", "model": str(model_dir)}


def test_too_long_prompt_fails_alone(monkeypatch, model_dir):
    module, calls = _fake_vllm(max_prompt_chars=20)
    monkeypatch.setitem(sys.modules, "vllm", module)
    backend = VLLMBackend(str(model_dir))
    prompts = ["short one", "x" * 50, "short two"]
    results = backend.generate(prompts, ["c"] * 3)
    assert results[0] == "answer to short one" and results[2] == "answer to short two"
    assert isinstance(results[1], Failure) and results[1].reason == "prompt_too_long" and not results[1].retryable
    assert calls["generate"][0] == prompts  # one batched call first, then one per prompt
    assert len(calls["generate"]) == 4


def test_other_engine_errors_propagate(monkeypatch, model_dir):
    module, _ = _fake_vllm()

    def broken(self, prompts, sampling, use_tqdm=True):
        raise ValueError("CUDA out of memory")

    module.LLM.generate = broken
    monkeypatch.setitem(sys.modules, "vllm", module)
    backend = VLLMBackend(str(model_dir))
    with pytest.raises(ValueError, match="out of memory"):
        backend.generate(["p"], ["c"])


def test_argument_checks(tmp_path, model_dir):
    with pytest.raises(UsageError, match="not a directory"):
        VLLMBackend(str(tmp_path / "absent"))
    with pytest.raises(UsageError, match="--tensor-parallel-size"):
        VLLMBackend(str(model_dir), tensor_parallel_size=0)
