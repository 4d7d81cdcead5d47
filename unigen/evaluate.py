"""Scoring a UniGen model on IGLUE test files (metrics: :mod:`unigen.iglue.scoring`).

    python -m unigen.evaluate --task xvnli --model runs/xvnli-en/model --images flickr30k-images/ \\
        --test ar=XVNLI/annotations/ar/test.jsonl es=XVNLI/annotations/es/test.jsonl \\
        [--out scores.json]

Each ``--test`` is ``NAME=FILE`` (or a bare file, named by its path). Prints one line per file
and the mean; ``--out`` writes every metric as JSON and ``--predictions DIR`` one
``<NAME>.jsonl`` of generated answers per file (a bare path's ``/`` become ``_``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from unigen.iglue.images import ImageResolver
from unigen.iglue.readers import IGLUE_TASKS, read_iglue
from unigen.training.distributed import resolve_device


def _named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        return spec, spec
    if not name or not path:
        raise ValueError(f"evaluate: --test entries are NAME=FILE or FILE, got {spec!r}")
    return name, path


def evaluate(task: str, model_dir: str, tests: list[str], images: str, *, batch_size: int = 64,
             max_new_tokens: int = 8, num_beams: int = 1, k: int = 16, workers: int = 2,
             device: str = "auto", precision: str = "auto", decode: str = "generate",
             predictions_dir: str | None = None, log=print) -> dict:
    """{name: metrics} for every test file, plus "mean" (of the task's headline metric).

    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16" or "fp32".
    decode: "generate" (the paper's protocol) or "rank" (xvnli, marvl: the likeliest keyword).
    """
    from unigen.iglue.scoring import check_decode, evaluate_file, headline
    from unigen.model.unigen_model import UniGen

    if task not in IGLUE_TASKS:
        raise ValueError(f"evaluate: task must be one of {IGLUE_TASKS}, got {task!r}")
    if not tests:
        raise ValueError("evaluate: no --test file")
    for name, v, low in (("batch_size", batch_size, 1), ("max_new_tokens", max_new_tokens, 1),
                         ("num_beams", num_beams, 1), ("k", k, 1), ("workers", workers, 0)):
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"evaluate: {name} must be an int >= {low}, got {v!r}")
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"evaluate: precision must be auto, bf16 or fp32, got {precision!r}")
    check_decode(task, decode, "evaluate")
    named = [_named(t) for t in tests]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"evaluate: test names must differ, got {names}")
    files = [(n, read_iglue(task, p)) for n, p in named]  # all formats checked before any work
    resolver = ImageResolver(images)
    dev = resolve_device(device)
    model = UniGen.from_pretrained(model_dir).to(dev).eval()
    amp = precision == "bf16" or (precision == "auto" and dev.type == "cuda")
    if predictions_dir:
        os.makedirs(predictions_dir, exist_ok=True)
    results = {}
    for name, f in files:
        log(f"{task} {name}: {len(f.records)} records"
            + (f" ({f.skipped} skipped: no usable label)" if f.skipped else ""))
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            metrics, preds = evaluate_file(model, f, resolver, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens, num_beams=num_beams,
                                           k=k, workers=workers, decode=decode, log=log)
        metrics["seconds"] = time.perf_counter() - t0
        results[name] = metrics
        log(f"{task} {name}: {headline(task, metrics):.2%} "
            f"({'R@1, mean of both directions, re-ranked' if task == 'xflickrco' else 'accuracy'})")
        if predictions_dir and preds is not None:
            # a bare path names the file: ar/test.jsonl → ar_test.jsonl.jsonl (IGLUE calls
            # every language's file test.jsonl)
            safe = name.replace("\\", "/").strip("/").replace("/", "_")
            with open(os.path.join(predictions_dir, f"{safe}.jsonl"), "w",
                      encoding="utf-8") as out:
                for p in preds:
                    out.write(json.dumps(p, ensure_ascii=False) + "\n")
    results["mean"] = sum(headline(task, results[n]) for n in names) / len(names)
    log(f"{task} mean over {len(names)} file(s): {results['mean']:.2%}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unigen.evaluate",
                                description="Score UniGen on IGLUE test files.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=IGLUE_TASKS)
    p.add_argument("--model", required=True, help="model directory (save_pretrained)")
    p.add_argument("--test", required=True, nargs="+", help="NAME=FILE or FILE")
    p.add_argument("--images", required=True, help="image root of the test files")
    p.add_argument("--out", help="write the metrics as JSON here")
    p.add_argument("--predictions", help="directory for <NAME>.jsonl of generated answers")
    p.add_argument("--batch-size", type=int, default=64, help="examples per generation call")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length")
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (1 = greedy)")
    p.add_argument("--k", type=int, default=16, help="retrieval: candidates re-ranked by [match]")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding images")
    p.add_argument("--device", default="auto", help="auto = cuda when available")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 autocast on cuda, fp32 elsewhere")
    p.add_argument("--decode", default="generate", choices=("generate", "rank"),
                   help="generate answers (the paper), or rank the keywords (xvnli, marvl)")
    a = p.parse_args(argv)
    try:
        results = evaluate(a.task, a.model, a.test, a.images, batch_size=a.batch_size,
                           max_new_tokens=a.max_new_tokens, num_beams=a.num_beams, k=a.k,
                           workers=a.workers, device=a.device, precision=a.precision,
                           decode=a.decode,
                           predictions_dir=a.predictions)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump({"task": a.task, "model": a.model, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
