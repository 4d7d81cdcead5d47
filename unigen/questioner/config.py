"""The questioner's config, read by the shared loader (:mod:`unigen.configuration`) like every
entry point's: ``--config FILE.yaml``, ``--section.key=value`` overrides, ``--help``,
``--print-config``, ``--version``. The command line it had before keeps working: each of its
flags is an alias of a key (:data:`QUESTIONER_FLAGS`; ``--backend vllm`` is
``--backend.name=vllm``, ``--no-progress`` sets ``progress=false``).

Checks that need no file are the loader's (types, choices); the rest — files, the prompt, a
backend's own arguments — are the run's, before any output is created (:mod:`.cli`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from unigen.configuration import Flag, check_choices


@dataclass(kw_only=True)
class ReaderConfig:
    """How captions are read from the input files."""

    input_format: Literal["auto", "text", "tsv", "jsonl", "wds"] = "auto"
    """Input format; "auto" picks it from each file's extension (.txt, .tsv, .jsonl, .tar)."""
    caption_field: str = "caption"
    """JSON-lines field holding the caption."""
    key_field: str = "key"
    """JSON-lines field holding the key (else the line number)."""
    wds_text_ext: str = "txt"
    """Extension of the caption member in webdataset shards."""
    max_caption_chars: int = 1000
    """Longer captions are skipped as bad lines."""


@dataclass(kw_only=True)
class BackendConfig:
    """The LLM that asks the questions, and how it decodes."""

    name: Literal["rule", "hf", "vllm", "http"] | None = None
    """rule: no LLM; hf: a transformers model folder; vllm: vLLM offline; http: an
    OpenAI-compatible server. Required unless ``print_prompt`` is given."""
    model: str | None = None
    """hf/vllm: the model folder; http: the model name sent to the server."""
    batch_size: int | None = None
    """Captions per generate call (None: the backend's own)."""
    max_new_tokens: int = 48
    temperature: float = 0.0
    """0 = greedy (reproducible, which keeps resumed and re-run shards consistent)."""
    top_p: float = 1.0
    device: str | None = None
    """hf: torch device (None: cuda when available, else cpu)."""
    dtype: str = "auto"
    """hf/vllm: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32."""
    trust_remote_code: bool = False
    """hf/vllm: allow model code from the model folder."""
    tensor_parallel_size: int = 1
    """vllm: GPUs per model replica."""
    gpu_memory_utilization: float = 0.9
    """vllm."""
    seed: int = 0
    """vllm: sampling seed."""
    endpoint: str | None = None
    """http: base URL, e.g. http://127.0.0.1:8000/v1."""
    api: Literal["completions", "chat"] = "completions"
    """http: which route to call."""
    timeout: float = 120.0
    """http: seconds per request."""
    retries: int = 3
    """http: retries per request after the first try."""
    backoff: float = 1.0
    """http: first retry delay in seconds (doubles each retry)."""
    concurrency: int = 8
    """http: requests in flight at once."""
    api_key_env: str = "OPENAI_API_KEY"
    """http: environment variable holding the API key (sent only if set)."""


@dataclass(kw_only=True)
class PromptConfig:
    """The few-shot prompt (docs/questioner.md)."""

    file: str | None = None
    """YAML/JSON prompt template {version, instruction, examples}."""
    instruction: str | None = None
    """Replace the template's instruction (then name the prompt with ``version``)."""
    version: str | None = None
    """Name this prompt (required with ``instruction``, so that runs stay traceable)."""


@dataclass(kw_only=True)
class FilterConfig:
    """Which generated pairs are kept."""

    max_pairs: int = 1
    """Pairs kept per caption."""
    max_answer_words: int = 6
    max_question_words: int = 32


@dataclass(kw_only=True)
class QuestionerConfig:
    """Everything ``python -m unigen.questioner`` needs."""

    captions: tuple[str, ...] = ()
    """Caption files: .txt (one per line), .tsv (caption<TAB>url), .jsonl, or webdataset .tar
    shards; quoted glob patterns are expanded."""
    out: str = ""
    """Output JSON lines {key, caption, question, answer}; beside it ``<out>.summary.json`` and
    ``<out>.config.yaml`` (this resolved config)."""
    overwrite: bool = False
    """Start over instead of resuming an existing ``out``."""
    shard: str = "0/1"
    """i/n: handle only the keys of shard i of n."""
    progress: bool = True
    """A progress bar."""
    print_prompt: str | None = None
    """Print the prompt rendered for this caption (with the prompt section applied) and exit."""
    reader: ReaderConfig = field(default_factory=ReaderConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)

    def __post_init__(self):
        for section, name in ((self.reader, "reader"), (self.backend, "backend")):
            check_choices(section, name)
        self.captions = tuple(self.captions)
        if self.print_prompt is None:
            missing = [flag for flag, value in (("--captions", self.captions), ("--out", self.out),
                                                ("--backend", self.backend.name)) if not value]
            if missing:
                raise ValueError(f"the following arguments are required: {', '.join(missing)} "
                                 f"(or --print-prompt CAPTION alone)")


# The questioner's flags before it read its config through the shared loader: each names a key.
QUESTIONER_FLAGS = {
    "input_format": "reader.input_format", "caption_field": "reader.caption_field",
    "key_field": "reader.key_field", "wds_text_ext": "reader.wds_text_ext",
    "max_caption_chars": "reader.max_caption_chars",
    "overwrite": Flag("overwrite", const="true"), "no_progress": Flag("progress", const="false"),
    "backend": "backend.name", "model": "backend.model", "batch_size": "backend.batch_size",
    "max_new_tokens": "backend.max_new_tokens", "temperature": "backend.temperature",
    "top_p": "backend.top_p", "device": "backend.device", "dtype": "backend.dtype",
    "trust_remote_code": Flag("backend.trust_remote_code", const="true"),
    "tensor_parallel_size": "backend.tensor_parallel_size",
    "gpu_memory_utilization": "backend.gpu_memory_utilization", "seed": "backend.seed",
    "endpoint": "backend.endpoint", "api": "backend.api", "timeout": "backend.timeout",
    "retries": "backend.retries", "backoff": "backend.backoff",
    "concurrency": "backend.concurrency", "api_key_env": "backend.api_key_env",
    "prompt": "prompt.file", "instruction": "prompt.instruction",
    "prompt_version": "prompt.version", "max_pairs": "filters.max_pairs",
    "max_answer_words": "filters.max_answer_words",
    "max_question_words": "filters.max_question_words",
}
