"""What every generation backend provides, and how it reports a prompt it could not answer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..errors import UsageError
from ..prompt import SENTENCE_TAG


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by the LLM backends.

    Greedy decoding (temperature 0) is the default: the questioner should extract, not invent,
    and greedy output is reproducible, which keeps resumed and re-run shards consistent.
    """

    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    # The model is done with this caption when it starts the next example.
    stop: tuple[str, ...] = (SENTENCE_TAG,)

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class Failure:
    """A prompt the backend could not answer.

    ``retryable`` failures (a timeout, a 5xx) are not recorded, so the next run asks again;
    permanent ones (the prompt does not fit the model's context, the endpoint rejected the request
    as invalid) are recorded as a rejection under ``reason`` so no run asks again.
    """

    reason: str
    retryable: bool
    detail: str = ""


Generation = str | Failure


class Backend(ABC):
    """Turns a batch of prompts (and their captions) into one generation per prompt, in order."""

    name: str = ""
    #: batch size used when --batch-size is not given: what keeps this backend busy.
    default_batch_size: int = 32

    @classmethod
    def preflight(cls, **kwargs) -> None:
        """Check the arguments cheaply (no model load, no request) before any file is touched.

        Raises ``UsageError``; the default has nothing to check.
        """

    @abstractmethod
    def generate(self, prompts: list[str], captions: list[str]) -> list[Generation]:
        """One generation (the text after the prompt) or ``Failure`` per prompt."""

    def describe(self) -> dict:
        """Name and model, for the run header and the summary."""
        return {"backend": self.name, "model": None}

    def close(self) -> None:
        """Release GPUs, threads or connections."""
