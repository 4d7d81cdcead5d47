"""``python -m unigen.questioner``: captions in, CCQA question–answer JSON lines out.

Examples::

    python -m unigen.questioner --captions cc3m.tsv --out ccqa.jsonl --backend vllm --model llama-30b/
    python -m unigen.questioner --captions cc3m.tsv --out ccqa.3.jsonl --backend hf --model llama/ --shard 3/8
    python -m unigen.questioner --captions 'shards/*.tar' --out ccqa.jsonl --backend http \\
        --endpoint http://127.0.0.1:8000/v1 --model llama-30b
    python -m unigen.questioner --captions cc3m.tsv --out ccqa.jsonl --backend rule

Re-running the same command resumes: captions already recorded are skipped.
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import threading
from pathlib import Path

from .backends import BACKENDS, GenerationSettings, backend_class
from .errors import QuestionerError, UsageError
from .filters import PairFilter
from .pipeline import Shard, run
from .prompt import PromptTemplate
from .readers import FORMATS, CaptionReader, check_readable
from .summary import RunStats, build_summary, format_summary, write_summary
from .writer import OutputStore, summary_path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unigen.questioner",
        description="Turn image captions into question-answer pairs with an LLM (UniGen §3.2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = p.add_argument_group("input and output")
    # --captions, --out and --backend are required unless --print-prompt is given (checked in main).
    io.add_argument("--captions", nargs="+", metavar="FILE",
                    help="caption files: .txt (one per line), .tsv (caption<TAB>url), .jsonl, or webdataset "
                         ".tar shards; quoted glob patterns are expanded")
    io.add_argument("--out", metavar="FILE", help="output JSON lines {key, caption, question, answer}")
    io.add_argument("--input-format", default="auto", choices=("auto",) + FORMATS,
                    help="input format; auto picks it from each file's extension")
    io.add_argument("--caption-field", default="caption", help="JSON-lines field holding the caption")
    io.add_argument("--key-field", default="key", help="JSON-lines field holding the key (else the line number)")
    io.add_argument("--wds-text-ext", default="txt", help="extension of the caption member in webdataset shards")
    io.add_argument("--max-caption-chars", type=int, default=1000, help="longer captions are skipped as bad lines")
    io.add_argument("--overwrite", action="store_true", help="start over instead of resuming an existing --out")
    io.add_argument("--shard", default="0/1", help="i/n: handle only the keys of shard i of n")
    io.add_argument("--no-progress", action="store_true", help="no progress bar")

    g = p.add_argument_group("backend")
    g.add_argument("--backend", choices=tuple(BACKENDS),
                   help="rule: no LLM; hf: transformers model dir; vllm: vLLM offline; http: OpenAI-compatible server")
    g.add_argument("--model", help="hf/vllm: model directory; http: model name sent to the server")
    g.add_argument("--batch-size", type=int, help="captions per generate call (default: per backend)")
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--device", help="hf: torch device (default cuda if available, else cpu)")
    g.add_argument("--dtype", default="auto",
                   help="hf/vllm: auto (bf16 on GPU, fp32 on CPU), bfloat16, float16, float32")
    g.add_argument("--trust-remote-code", action="store_true", help="hf/vllm: allow model code from the model dir")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model replica")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vllm")
    g.add_argument("--seed", type=int, default=0, help="vllm: sampling seed")
    g.add_argument("--endpoint", help="http: base URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api", default="completions", choices=("completions", "chat"), help="http: which route to call")
    g.add_argument("--timeout", type=float, default=120.0, help="http: seconds per request")
    g.add_argument("--retries", type=int, default=3, help="http: retries per request after the first try")
    g.add_argument("--backoff", type=float, default=1.0, help="http: first retry delay in seconds (doubles each retry)")
    g.add_argument("--concurrency", type=int, default=8, help="http: requests in flight at once")
    g.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="http: environment variable holding the API key (sent only if set)")

    f = p.add_argument_group("prompt and filters")
    f.add_argument("--prompt", metavar="FILE", help="YAML/JSON prompt template {version, instruction, examples}")
    f.add_argument("--instruction", help="replace the template's instruction")
    f.add_argument("--prompt-version", help="name this prompt (required with --instruction so runs stay traceable)")
    f.add_argument("--max-pairs", type=int, default=1, help="pairs kept per caption")
    f.add_argument("--max-answer-words", type=int, default=6)
    f.add_argument("--max-question-words", type=int, default=32)
    f.add_argument("--print-prompt", metavar="CAPTION",
                   help="print the prompt rendered for CAPTION (with --prompt/--instruction applied) and exit")
    return p


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


def _template(args) -> PromptTemplate:
    template = PromptTemplate.from_file(args.prompt) if args.prompt else PromptTemplate()
    if args.instruction is not None:
        if not args.prompt_version:
            raise UsageError("--instruction changes the prompt: give it a name with --prompt-version")
        return PromptTemplate(version=args.prompt_version, instruction=args.instruction, examples=template.examples)
    if args.prompt_version:
        return PromptTemplate(version=args.prompt_version, instruction=template.instruction, examples=template.examples)
    return template


def _backend_kwargs(args, settings: GenerationSettings) -> dict:
    if args.backend == "rule":
        return {}
    if args.backend == "hf":
        return {"model": args.model, "settings": settings, "device": args.device, "dtype": args.dtype,
                "trust_remote_code": args.trust_remote_code}
    if args.backend == "vllm":
        return {"model": args.model, "settings": settings, "dtype": args.dtype,
                "tensor_parallel_size": args.tensor_parallel_size,
                "gpu_memory_utilization": args.gpu_memory_utilization, "seed": args.seed,
                "trust_remote_code": args.trust_remote_code}
    if not args.endpoint:
        raise UsageError("--endpoint is required for --backend http")
    return {"endpoint": args.endpoint, "model": args.model, "settings": settings, "api": args.api,
            "timeout": args.timeout, "retries": args.retries, "backoff": args.backoff,
            "concurrency": args.concurrency, "api_key": os.environ.get(args.api_key_env) or None}


def _main(args) -> int:
    template = _template(args)
    if args.print_prompt is not None:
        print(template.render(args.print_prompt))
        return 0
    pair_filter = PairFilter(args.max_answer_words, args.max_question_words)
    if args.max_pairs < 1:
        raise UsageError(f"--max-pairs must be positive, got {args.max_pairs}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    shard = Shard.parse(args.shard)
    paths = _expand(args.captions)
    check_readable(paths)
    out = Path(args.out)
    if any(out.resolve() == p.resolve() for p in paths):
        raise UsageError(f"--out {out} is also one of the --captions inputs")
    reader = CaptionReader(paths, args.input_format, args.caption_field, args.key_field, args.wds_text_ext,
                           args.max_caption_chars)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p)
    kwargs = _backend_kwargs(args, settings)
    backend_cls = backend_class(args.backend)
    backend_cls.preflight(**kwargs)

    header = {
        "backend": args.backend,
        "model": args.model if args.backend != "http" else (args.model or args.endpoint),
        "prompt_version": template.version,
        "shard": str(shard),
        "max_pairs": args.max_pairs,
        "max_answer_words": pair_filter.max_answer_words,
        "max_question_words": pair_filter.max_question_words,
        "max_new_tokens": settings.max_new_tokens,
        "temperature": settings.temperature,
    }
    # The store is opened before the backend is built: a locked or inconsistent output is found
    # in a second, not after loading a 30B model.
    store = OutputStore(out, run_header=header, overwrite=args.overwrite).open()
    stats = RunStats()
    status = "failed"
    backend = None
    try:
        for warning in store.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        backend = backend_cls(**kwargs)
        run(reader, backend, store, template=template, pair_filter=pair_filter, shard=shard,
            batch_size=args.batch_size, max_pairs=args.max_pairs, stats=stats, progress=not args.no_progress)
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_prompt is None:
        missing = [f"--{n}" for n in ("captions", "out", "backend") if getattr(args, n) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _main(args)
    except QuestionerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
