"""``python -m unigen.questioner``: captions in, CCQA question–answer JSON lines out.

Examples::

    python -m unigen.questioner --captions cc3m.tsv --out ccqa.jsonl --backend vllm --model llama-30b/
    python -m unigen.questioner --captions cc3m.tsv --out ccqa.3.jsonl --backend hf --model llama/ --shard 3/8
    python -m unigen.questioner --captions 'shards/*.tar' --out ccqa.jsonl --backend http \\
        --endpoint http://127.0.0.1:8000/v1 --model llama-30b
    python -m unigen.questioner --captions cc3m.tsv --out ccqa.jsonl --backend rule
    python -m unigen.questioner --config questioner.yaml [--section.key=value ...]

Re-running the same command resumes: captions already recorded are skipped. Every key, its
flag and its default: ``python -m unigen.questioner --help`` (:mod:`unigen.questioner.config`).
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import threading
from pathlib import Path

from unigen.configuration import ConfigError, print_error, run_cli, save_config

from .backends import GenerationSettings, backend_class
from .config import QUESTIONER_FLAGS, QuestionerConfig
from .errors import QuestionerError, UsageError
from .filters import PairFilter
from .pipeline import Shard, run
from .prompt import PromptTemplate
from .readers import CaptionReader, check_readable
from .summary import RunStats, build_summary, format_summary, write_summary
from .writer import OutputStore, summary_path

PROG = "python -m unigen.questioner"


def _expand(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise UsageError(f"--captions: no file matches {pattern!r}")
            paths.extend(Path(m) for m in matches)
        else:
            paths.append(Path(pattern))
    return paths


def _template(p) -> PromptTemplate:
    template = PromptTemplate.from_file(p.file) if p.file else PromptTemplate()
    if p.instruction is not None:
        if not p.version:
            raise UsageError("--instruction changes the prompt: give it a name with --prompt-version")
        return PromptTemplate(version=p.version, instruction=p.instruction, examples=template.examples)
    if p.version:
        return PromptTemplate(version=p.version, instruction=template.instruction, examples=template.examples)
    return template


def _backend_kwargs(b, settings: GenerationSettings) -> dict:
    if b.name == "rule":
        return {}
    if b.name == "hf":
        return {"model": b.model, "settings": settings, "device": b.device, "dtype": b.dtype,
                "trust_remote_code": b.trust_remote_code}
    if b.name == "vllm":
        return {"model": b.model, "settings": settings, "dtype": b.dtype,
                "tensor_parallel_size": b.tensor_parallel_size,
                "gpu_memory_utilization": b.gpu_memory_utilization, "seed": b.seed,
                "trust_remote_code": b.trust_remote_code}
    if not b.endpoint:
        raise UsageError("--endpoint is required for --backend http")
    return {"endpoint": b.endpoint, "model": b.model, "settings": settings, "api": b.api,
            "timeout": b.timeout, "retries": b.retries, "backoff": b.backoff,
            "concurrency": b.concurrency, "api_key": os.environ.get(b.api_key_env) or None}


def _main(cfg: QuestionerConfig) -> int:
    b, f = cfg.backend, cfg.filters
    template = _template(cfg.prompt)
    if cfg.print_prompt is not None:
        print(template.render(cfg.print_prompt))
        return 0
    pair_filter = PairFilter(f.max_answer_words, f.max_question_words)
    if f.max_pairs < 1:
        raise UsageError(f"--max-pairs must be positive, got {f.max_pairs}")
    if b.batch_size is not None and b.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {b.batch_size}")
    shard = Shard.parse(cfg.shard)
    paths = _expand(cfg.captions)
    check_readable(paths)
    out = Path(cfg.out)
    if any(out.resolve() == p.resolve() for p in paths):
        raise UsageError(f"--out {out} is also one of the --captions inputs")
    r = cfg.reader
    reader = CaptionReader(paths, r.input_format, r.caption_field, r.key_field, r.wds_text_ext,
                           r.max_caption_chars)
    settings = GenerationSettings(b.max_new_tokens, b.temperature, b.top_p)
    kwargs = _backend_kwargs(b, settings)
    backend_cls = backend_class(b.name)
    backend_cls.preflight(**kwargs)

    header = {
        "backend": b.name,
        "model": b.model if b.name != "http" else (b.model or b.endpoint),
        "prompt_version": template.version,
        "shard": str(shard),
        "max_pairs": f.max_pairs,
        "max_answer_words": pair_filter.max_answer_words,
        "max_question_words": pair_filter.max_question_words,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
    }
    # The store is opened before the backend is built: a locked or inconsistent output is found
    # in a second, not after loading a 30B model.
    store = OutputStore(out, run_header=header, overwrite=cfg.overwrite).open()
    save_config(cfg, f"{out}.config.yaml")
    print(f"[unigen.questioner] {len(paths)} caption file(s) → {out}: backend {b.name}"
          + (f" ({header['model']})" if header["model"] else "")
          + f", prompt {template.version}, shard {shard}, up to {f.max_pairs} pair(s) per "
          f"caption" + (f"; resuming, {store.totals.captions} captions done"
                        if store.totals.captions else ""), flush=True)
    stats = RunStats()
    status = "failed"
    backend = None
    try:
        for warning in store.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        backend = backend_cls(**kwargs)
        run(reader, backend, store, template=template, pair_filter=pair_filter, shard=shard,
            batch_size=b.batch_size, max_pairs=f.max_pairs, stats=stats, progress=cfg.progress)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if backend is not None:
            backend.close()
        summary = build_summary(status, header, store.totals, stats)
        store.close()
        write_summary(summary_path(out), summary)
        print(format_summary(summary))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job): stop like Ctrl-C, between two batches."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _run(cfg: QuestionerConfig) -> int:
    """The run behind the shared front (:func:`unigen.configuration.run_cli`): a questioner
    error prints one line and gives its exit status (2 for bad usage, 1 for a failing
    backend); SIGTERM stops between two batches like Ctrl-C."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(cfg)
    except QuestionerError as exc:
        print_error(PROG, exc)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """``python -m unigen.questioner ...``: returns the exit status (2: a bad argument, named
    in one line)."""
    return run_cli(QuestionerConfig, _run, argv, prog=PROG, description=__doc__,
                   aliases=QUESTIONER_FLAGS, errors=(ConfigError, FileNotFoundError))
