"""Scoring a UniGen model on IGLUE test files (metrics: :mod:`unigen.iglue.scoring`).

    python -m unigen.evaluate --task xvnli --model runs/xvnli-en/model --images flickr30k-images/ \\
        --test ar=XVNLI/annotations/ar/test.jsonl es=XVNLI/annotations/es/test.jsonl \\
        [--out scores.json]
    python -m unigen.evaluate --config evaluate.yaml [--section.key=value ...]

Each test is ``NAME=FILE`` (or a bare file, named by its path). Prints one line per file and
the mean; ``--out`` writes every metric and the resolved config as JSON and ``--predictions
DIR`` one ``<NAME>.jsonl`` of generated answers per file (a bare path's ``/`` become ``_``).
Config and flags: :class:`~unigen.iglue.config.EvaluateConfig`.
"""

from __future__ import annotations

import json
import os
import time

import torch

from unigen.configuration import config_to_dict, run_cli
from unigen.training.distributed import resolve_device

from .config import EVALUATE_FLAGS, EvaluateConfig, ScoringConfig
from .images import ImageResolver
from .readers import read_iglue
from .scoring import evaluate_file, headline


def evaluate(task: str, model_dir: str, tests: list[str], images: str, *, batch_size: int = 64,
             max_new_tokens: int = 8, num_beams: int = 1, k: int = 16, workers: int = 2,
             device: str = "auto", precision: str = "auto", decode: str = "generate",
             predictions_dir: str | None = None, log=print) -> dict:
    """{name: metrics} for every test file, plus "mean" (of the task's headline metric).

    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16" or "fp32".
    decode: "generate" (the paper's protocol) or "rank" (xvnli, marvl: the likeliest keyword).
    """
    cfg = EvaluateConfig(task=task, model=model_dir, tests=tuple(tests), images=images,
                         predictions=predictions_dir or "", device=device, precision=precision,
                         scoring=ScoringConfig(batch_size=batch_size, workers=workers,
                                               decode=decode, max_new_tokens=max_new_tokens,
                                               num_beams=num_beams, k=k))
    return run_evaluation(cfg, log=log)


def run_evaluation(cfg: EvaluateConfig, *, log=print) -> dict:
    """:func:`evaluate` from a config."""
    from unigen.model.unigen_model import UniGen

    task, sc = cfg.task, cfg.scoring
    named = cfg.named_tests()
    files = [(n, read_iglue(task, p)) for n, p in named]  # all formats checked before any work
    resolver = ImageResolver(cfg.images)
    dev = resolve_device(cfg.device)
    model = UniGen.from_pretrained(cfg.model).to(dev).eval()
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    if cfg.predictions:
        os.makedirs(cfg.predictions, exist_ok=True)
    results = {}
    for name, f in files:
        log(f"{task} {name}: {len(f.records)} records"
            + (f" ({f.skipped} skipped: no usable label)" if f.skipped else ""))
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            metrics, preds = evaluate_file(model, f, resolver, batch_size=sc.batch_size,
                                           max_new_tokens=sc.max_new_tokens,
                                           num_beams=sc.num_beams, k=sc.k, workers=sc.workers,
                                           decode=sc.decode, log=log)
        metrics["seconds"] = time.perf_counter() - t0
        results[name] = metrics
        log(f"{task} {name}: {headline(task, metrics):.2%} "
            f"({'R@1, mean of both directions, re-ranked' if task == 'xflickrco' else 'accuracy'})")
        if cfg.predictions and preds is not None:
            with open(cfg.predictions_file(name), "w", encoding="utf-8") as out:
                for p in preds:
                    out.write(json.dumps(p, ensure_ascii=False) + "\n")
    names = [n for n, _ in named]
    results["mean"] = sum(headline(task, results[n]) for n in names) / len(names)
    log(f"{task} mean over {len(names)} file(s): {results['mean']:.2%}")
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({"task": task, "model": cfg.model, "results": results,
                       "config": config_to_dict(cfg)}, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    return run_cli(EvaluateConfig, run_evaluation, argv, prog="python -m unigen.evaluate",
                   description=__doc__, aliases=EVALUATE_FLAGS)
