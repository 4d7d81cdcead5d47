"""vLLM offline batch inference: the fastest way to question all of CC3M on a GPU node.

vLLM is imported only when this backend is built, so the questioner (and everything else in
UniGen) works where vLLM is not installed; asking for it there is a clear error. vLLM schedules
the whole batch itself (continuous batching, prefix caching of the shared few-shot prompt), so
this backend hands it large batches and keeps no state of its own beyond the engine.
"""

from __future__ import annotations

import importlib.util

from ..errors import UsageError
from .base import Backend, Failure, Generation, GenerationSettings
from .hf import check_model_dir

_MISSING = "--backend vllm needs vLLM, which is not installed here"


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise UsageError(
            f"{_MISSING} ({exc}); pip install vllm on a GPU machine, or use --backend hf / --backend http"
        ) from exc
    return vllm


def _is_too_long(exc: Exception) -> bool:
    # vLLM rejects the whole batch with a ValueError naming the context limit when one prompt
    # does not fit; the wording has varied across releases but always names the length.
    msg = str(exc).lower()
    return "longer than" in msg or "maximum model length" in msg or "max_model_len" in msg or "context length" in msg


class VLLMBackend(Backend):
    name = "vllm"
    default_batch_size = 1024

    @classmethod
    def preflight(cls, *, model=None, **_) -> None:
        check_model_dir(model, cls.name)
        try:
            found = importlib.util.find_spec("vllm") is not None
        except ValueError:  # sys.modules["vllm"] is None: import explicitly disabled
            found = False
        if not found:
            raise UsageError(f"{_MISSING}; pip install vllm on a GPU machine, or use --backend hf / --backend http")

    def __init__(
        self,
        model: str | None,
        *,
        settings: GenerationSettings = GenerationSettings(),
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        path = check_model_dir(model, self.name)
        if tensor_parallel_size < 1:
            raise UsageError(f"--tensor-parallel-size must be >= 1, got {tensor_parallel_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise UsageError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
        vllm = _import_vllm()
        self.path = path
        self.llm = vllm.LLM(
            model=str(path),
            # vLLM's "auto" already means bf16 for bf16 checkpoints; spell the paper's choice out.
            dtype="bfloat16" if dtype == "auto" else dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            trust_remote_code=trust_remote_code,
            enable_prefix_caching=True,  # every prompt shares the instruction + examples prefix
        )
        self.sampling = vllm.SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stop=list(settings.stop),
            seed=seed,
        )

    def describe(self) -> dict:
        return {"backend": self.name, "model": str(self.path)}

    def _run(self, prompts: list[str]) -> list[str]:
        outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
        return [o.outputs[0].text if o.outputs else "" for o in outputs]

    def generate(self, prompts: list[str], captions: list[str]) -> list[Generation]:
        try:
            return list(self._run(prompts))
        except ValueError as exc:
            if not _is_too_long(exc):
                raise
        # One prompt is too long for the context: find it (them) one by one so the rest of the
        # batch is still answered. Rare (captions are short), so the slow path is acceptable.
        results: list[Generation] = []
        for prompt in prompts:
            try:
                results.append(self._run([prompt])[0])
            except ValueError as exc:
                if not _is_too_long(exc):
                    raise
                results.append(Failure("prompt_too_long", retryable=False, detail=str(exc)[:200]))
        return results

    def close(self) -> None:
        self.llm = None
