"""Scoring a UniGen model on IGLUE test files (metrics: :mod:`unigen.iglue.scoring`).

    python -m unigen.evaluate --task xvnli --model runs/xvnli-en/model --images flickr30k-images/ \\
        --test ar=XVNLI/annotations/ar/test.jsonl es=XVNLI/annotations/es/test.jsonl \\
        [--out scores.json]
    python -m unigen.evaluate --config evaluate.yaml [--section.key=value ...]

Each test is ``NAME=FILE`` (or a bare file, named by its path). Every file is read and every
image resolved before the model is loaded; a missing, ambiguous or undecodable image stops the
run naming it. Prints progress (images/s, time left), one line per file (accuracy and relaxed
accuracy; for retrieval IR, TR and their mean) and the mean over files; ``--out`` writes every
metric, the seconds per file and the resolved config as JSON and ``--predictions DIR`` one
``<NAME>.jsonl`` per file (a bare path's ``/`` become ``_``): the generated answers, or for
retrieval every caption's ranked images and every image's ranked captions.
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
from .readers import RETRIEVAL_TASKS, read_answer_set, read_iglue
from .scoring import evaluate_file, headline


def evaluate(task: str, model_dir: str, tests: list[str], images: str, *, batch_size: int = 64,
             max_new_tokens: int = 8, num_beams: int = 1, k: int = 16, workers: int = 2,
             device: str = "auto", precision: str = "auto", decode: str = "generate",
             answers: str = "", pair_images: str = "side_by_side",
             predictions_dir: str | None = None, log=print) -> dict:
    """{name: metrics} for every test file, plus "mean" (of the task's headline metric).

    precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "bf16" or "fp32".
    decode: "generate" (the paper's protocol) or "rank" (xvnli, marvl: the likeliest keyword;
    xgqa: the likeliest answer of ``answers``, IGLUE's label→answer JSON).
    """
    cfg = EvaluateConfig(task=task, model=model_dir, tests=tuple(tests), images=images,
                         predictions=predictions_dir or "", device=device, precision=precision,
                         pair_images=pair_images,
                         scoring=ScoringConfig(batch_size=batch_size, workers=workers,
                                               decode=decode, answers=answers,
                                               max_new_tokens=max_new_tokens,
                                               num_beams=num_beams, k=k))
    return run_evaluation(cfg, log=log)


def run_evaluation(cfg: EvaluateConfig, *, log=print) -> dict:
    """:func:`evaluate` from a config."""
    from unigen.model.unigen_model import UniGen

    task, sc = cfg.task, cfg.scoring
    named = cfg.named_tests()
    files = [(n, read_iglue(task, p)) for n, p in named]  # all formats checked before any work
    resolver = ImageResolver(cfg.images)
    for _, f in files:  # and every image found (the loaders resolve again, from the cache)
        resolver.check(f.path, f.records)
    answer_set = read_answer_set(sc.answers) if sc.answers else None
    dev = resolve_device(cfg.device)
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda")
    log(f"[unigen.evaluate] {task}: {cfg.model} on {len(files)} test file(s), "
        f"{sum(len(f.records) for _, f in files):,} records, {dev.type} "
        f"({'bf16 autocast' if amp else 'fp32'}), batch {sc.batch_size}"
        + (f", decode {sc.decode}" if task not in RETRIEVAL_TASKS else f", top {sc.k} re-ranked")
        + (f"; scores to {cfg.out}" if cfg.out else "")
        + (f"; predictions to {cfg.predictions}" if cfg.predictions else ""))
    model = UniGen.from_pretrained(cfg.model).to(dev).eval()
    if cfg.predictions:
        os.makedirs(cfg.predictions, exist_ok=True)
    results = {}
    for name, f in files:
        log(f"{task} {name}: {len(f.records)} records"
            + (f", {sum(len(r.texts) for r in f.records)} captions" if task in RETRIEVAL_TASKS
               else "")
            + (f" ({f.skipped} skipped: no usable label)" if f.skipped else "")
            + (f" ({f.empty_texts} empty captions, kept as queries)" if f.empty_texts else ""))
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            metrics, preds = evaluate_file(model, f, resolver, batch_size=sc.batch_size,
                                           max_new_tokens=sc.max_new_tokens,
                                           num_beams=sc.num_beams, k=sc.k, workers=sc.workers,
                                           decode=sc.decode, answer_set=answer_set,
                                           pair_images=cfg.pair_images, log=log)
        metrics["seconds"] = time.perf_counter() - t0
        metrics["records_per_second"] = len(f.records) / max(metrics["seconds"], 1e-9)
        results[name] = metrics
        if task in RETRIEVAL_TASKS:
            log(f"{task} {name}: IR R@1 {metrics['ir_r1']:.2%}, TR R@1 {metrics['tr_r1']:.2%}, "
                f"mean {metrics['r1']:.2%} (re-ranked; contrastive only: IR "
                f"{metrics['ir_r1_contrastive']:.2%}, TR {metrics['tr_r1_contrastive']:.2%}) "
                f"in {metrics['seconds']:.0f} s")
        else:
            log(f"{task} {name}: accuracy {metrics['accuracy']:.2%} (relaxed: "
                f"{metrics['relaxed_accuracy']:.2%}) in {metrics['seconds']:.0f} s")
        if cfg.predictions:
            path = cfg.predictions_file(name)
            with open(path, "w", encoding="utf-8") as out:
                for p in preds:
                    out.write(json.dumps(p, ensure_ascii=False) + "\n")
            log(f"{task} {name}: predictions in {path} ("
                + ("each caption's ranked images and each image's ranked captions"
                   if task in RETRIEVAL_TASKS else "the answer per example") + ")")
    names = [n for n, _ in named]
    results["mean"] = sum(headline(task, results[n]) for n in names) / len(names)
    if task in RETRIEVAL_TASKS:
        for key in ("ir_r1", "tr_r1"):
            results[f"mean_{key}"] = sum(results[n][key] for n in names) / len(names)
    log(f"{task} mean over {len(names)} file(s): {results['mean']:.2%}"
        + (f" (IR {results['mean_ir_r1']:.2%}, TR {results['mean_tr_r1']:.2%})"
           if task in RETRIEVAL_TASKS else ""))
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump({"task": task, "model": cfg.model, "results": results,
                       "config": config_to_dict(cfg)}, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    return run_cli(EvaluateConfig, run_evaluation, argv, prog="python -m unigen.evaluate",
                   description=__doc__, aliases=EVALUATE_FLAGS)
