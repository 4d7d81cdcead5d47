"""A local Hugging Face causal LM, loaded from a directory, with batched generation.

bf16 on a GPU (the paper's Llama-30B needs it to fit), fp32 on CPU where bf16 matmuls are slow.
Prompts are padded on the left so every row's continuation starts at the same column, and
generation stops per row at the ``<sentence>`` tag (the model opening the next example), which
is most of the saving for a few-shot prompt whose answers are a dozen tokens long.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import UsageError
from .base import Backend, Failure, Generation, GenerationSettings

_DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_model_dir(model: str | None, backend: str) -> Path:
    if not model:
        raise UsageError(f"--model is required for --backend {backend}: a directory holding the model")
    path = Path(model)
    if not path.is_dir():
        raise UsageError(f"--model: {path} is not a directory (the {backend} backend loads a local model)")
    if not (path / "config.json").is_file():
        raise UsageError(f"--model: {path} has no config.json; it is not a Hugging Face model directory")
    return path


class HFBackend(Backend):
    name = "hf"
    default_batch_size = 16

    @classmethod
    def preflight(cls, *, model=None, dtype="auto", **_) -> None:
        check_model_dir(model, cls.name)
        if dtype not in _DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        if importlib.util.find_spec("transformers") is None:
            raise UsageError("--backend hf needs transformers, which is not installed; pip install transformers")

    def __init__(
        self,
        model: str | None,
        *,
        settings: GenerationSettings = GenerationSettings(),
        device: str | None = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ):
        path = check_model_dir(model, self.name)
        if dtype not in _DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        try:
            import torch
            import transformers
        except ImportError as exc:
            raise UsageError(f"--backend hf needs torch and transformers ({exc}); pip install transformers") from exc

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as exc:
            raise UsageError(f"--device: {exc}") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA device is available")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)

        self.path = path
        self.settings = settings
        self._torch = torch
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                path, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise UsageError(f"--model: cannot load a causal LM and tokenizer from {path}: {exc}") from exc
        self.model.to(self.device).eval()
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise UsageError(f"--model: the tokenizer in {path} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Room the context leaves for the prompt once the answer's tokens are reserved.
        limit = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None
        )
        self.max_prompt_tokens = None if limit is None else limit - settings.max_new_tokens
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise UsageError(
                f"--max-new-tokens {settings.max_new_tokens} leaves no room for a prompt in the "
                f"model's {limit}-token context"
            )

    def describe(self) -> dict:
        return {"backend": self.name, "model": str(self.path)}

    def generate(self, prompts: list[str], captions: list[str]) -> list[Generation]:
        torch = self._torch
        results: list[Generation | None] = [None] * len(prompts)
        # Special tokens as the tokenizer defines them (Llama's BOS, none for GPT-2).
        ids = self.tokenizer(prompts)["input_ids"]
        todo = []
        for i, seq in enumerate(ids):
            if self.max_prompt_tokens is not None and len(seq) > self.max_prompt_tokens:
                results[i] = Failure(
                    "prompt_too_long", retryable=False,
                    detail=f"{len(seq)} prompt tokens > {self.max_prompt_tokens} that fit the context",
                )
            else:
                todo.append(i)
        if todo:
            enc = self.tokenizer(
                [prompts[i] for i in todo], return_tensors="pt", padding=True
            ).to(self.device)
            s = self.settings
            sampling = ({"do_sample": True, "temperature": s.temperature, "top_p": s.top_p}
                        if s.temperature > 0 else {"do_sample": False})
            with torch.inference_mode():
                out = self.model.generate(
                    **enc,
                    max_new_tokens=s.max_new_tokens,
                    stop_strings=list(s.stop),
                    tokenizer=self.tokenizer,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            texts = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in zip(todo, texts):
                results[i] = text
        return results

    def close(self) -> None:
        self.model = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
