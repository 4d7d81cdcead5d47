"""`make demo`: pre-train a tiny UniGen on the embedded synthetic multilingual world, then
measure what crosses over to languages that never met an image.

1. writes the synthetic world (unigen.data.synthetic_world) in the real file formats: webdataset
   image shards with English captions, CC6L captions in de/fr/ja, CCQA questions, WikiMatrix
   translation pairs for every language; ``es`` and ``sw`` occur *only* in translation pairs;
2. trains the tiny tokenizers on its text;
3. pre-trains two tiny models with ``python -m unigen.train`` side by side (one CPU thread each):
   UniGen with every task, and the ablation without translation pairs;
4. evaluates both on held-out images with captions and questions in every language: image→text
   and text→image R@1 by contrastive similarity and after [match] re-ranking of the contrastive
   top-k, and open-vocabulary QA accuracy; prints the table next to chance, saves it (JSON and
   markdown) and the loss curves (PNG).

    python -m unigen.demo [--config FILE.yaml] [--out runs/demo] [--steps 3000] [--batch-size 48]
        [--multilingual-fraction 0.5]      (every key: python -m unigen.demo --help)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

RUNS = {"unigen": "UniGen (all tasks)", "no_translation": "ablation: no translation pairs"}


def _write_inputs(out: str, args) -> tuple:
    from unigen.data.synthetic_world import all_texts, write_synthetic_world
    from unigen.model.tokenizers import train_tiny_tokenizers

    world = write_synthetic_world(os.path.join(out, "world"), num_images=args.images,
                                  num_text_pairs=args.text_pairs, num_eval_images=args.eval_images,
                                  image_size=32, max_objects=1, seed=args.seed)
    tok = train_tiny_tokenizers(all_texts(world), os.path.join(out, "tokenizers"))
    return world, tok


def _train_config(name: str, world, tok, out: str, args):
    from unigen.data.config import DataConfig
    from unigen.model.config import UniGenConfig
    from unigen.pretraining import PretrainConfig
    from unigen.training.config import CheckpointConfig, LoggingConfig, OptimConfig, RunConfig, ScheduleConfig

    model = UniGenConfig.tiny()
    # There is no pre-trained CLIP to freeze in a world made up on the spot: the tiny ViT
    # trains with the rest (the paper freezes a pre-trained CLIP ViT-L/14). 4-pixel patches:
    # with 8-pixel ones every object straddles four patches that neighbouring positions share,
    # and a from-scratch ViT did not learn positions (a probe stayed at chance).
    model.vision = dataclasses.replace(model.vision, frozen=False, patch_size=4)
    # L_CL at weight 1 (the paper's, with a pre-trained image encoder) dominates the gradients
    # of this from-scratch one: measured, the model then never learned object positions and
    # English R@1 stayed near 25%; at 0.02 every task learns, L_CL itself included.
    model.loss.contrastive_weight = args.contrastive_weight
    model.text.vocab_size, model.decoder.vocab_size = tok.text_vocab_size, tok.decoder_vocab_size
    ratios = {"trans": args.trans_ratio, "cap": 1.0, "qus": 1.0, "match": 1.0}
    wikimatrix = tuple(world.wikimatrix)
    if name == "no_translation":
        ratios.pop("trans")
        wikimatrix = ()
    data = DataConfig(wikimatrix=wikimatrix, image_shards=tuple(world.image_shards),
                      cc6l=(world.cc6l,), ccqa=(world.ccqa,), ratios=ratios, image_size=32,
                      image_backend="pil", max_encoder_len=16, max_target_len=24,
                      encoder_tokenizer=tok.text_dir, decoder_tokenizer=tok.decoder_dir,
                      multilingual_fraction=args.multilingual_fraction,
                      batch_size=args.batch_size, num_workers=0, seed=args.seed)
    return PretrainConfig(
        model=model, data=data,
        # A short run on a toy world: a constant learning rate after a brief warm-up and no
        # clipping learn it fastest (the paper's recipe, linear decay, is the trainer's default).
        optim=OptimConfig(lr=args.lr, grad_clip=0.0),
        schedule=ScheduleConfig(steps=args.steps, warmup_steps=min(100, args.steps // 10),
                                decay="constant"),
        run=RunConfig(output_dir=os.path.join(out, name), seed=args.seed, device="cpu",
                      precision="fp32"),
        checkpoint=CheckpointConfig(every=max(1, args.steps // 2), keep_last=1, resume="never"),
        logging=LoggingConfig(every=25, console=False, tensorboard=False, progress_bar=False))


def _clear_previous_runs(configs: dict) -> None:
    """A second ``make demo`` replaces the first: the trainer refuses a run directory that holds
    checkpoints (``resume: never``), so the demo removes the run directories it wrote before —
    only those (``<out>/unigen``, ``<out>/no_translation``), nothing else under ``--out``."""
    for cfg in configs.values():
        run_dir = cfg.run.output_dir
        if os.path.isdir(run_dir):
            print(f"[demo] replacing the previous run in {run_dir}")
            shutil.rmtree(run_dir)


def _last_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def _train_both(configs: dict, out: str, steps: int) -> None:
    """Both runs in parallel, one thread each (2 cores), with one progress bar over both."""
    from tqdm import tqdm

    from unigen.configuration import save_config

    procs = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name, cfg in configs.items():
        path = os.path.join(out, f"{name}.yaml")
        save_config(cfg, path)
        log = open(os.path.join(out, f"{name}.log"), "w")
        procs[name] = (subprocess.Popen([sys.executable, "-m", "unigen.train", "--config", path],
                                        stdout=log, stderr=subprocess.STDOUT, env=env), log)
    bar = tqdm(total=steps * len(configs), desc="pre-training (both runs)", unit="step")
    try:
        while True:
            done = sum(_last_step(cfg.run.output_dir) for cfg in configs.values())
            bar.update(done - bar.n)
            codes = {n: p.poll() for n, (p, _) in procs.items()}
            if all(c is not None for c in codes.values()):
                break
            if any(c not in (None, 0) for c in codes.values()):
                break
            time.sleep(2)
    finally:
        bar.close()
        for p, log in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait()
            log.close()
    failed = [n for n, (p, _) in procs.items() if p.returncode != 0]
    if failed:
        raise SystemExit(f"training failed for {failed}; see {[os.path.join(out, n + '.log') for n in failed]}")


def _loss_curves(configs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("loss/trans", "loss/cap", "loss/qus", "loss/match", "loss/cl")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for name, cfg in configs.items():
        with open(os.path.join(cfg.run.output_dir, "metrics.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=RUNS[name])
            ax.set_title(key.split("/")[-1])
            ax.set_xlabel("step")
            ax.set_yscale("log")  # the late differences between the runs are 0.1 against 0.4
    axes[1].legend(fontsize=7)  # the first panel (trans) has no ablation curve
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _qa_chance(split) -> float:
    """Expected accuracy of a uniform guess among the answers of each question's kind."""
    from unigen.data.synthetic_world import COLOURS, LEXICONS, POSITIONS, SHAPES

    options = {**{c: len(COLOURS) for c in COLOURS}, **{s: len(SHAPES) for s in SHAPES},
               **{LEXICONS["en"].positions[p]: len(POSITIONS) for p in POSITIONS}}
    return sum(1.0 / options[r["answer"]] for r in split.qa) / len(split.qa)


def _evaluate(configs: dict, world) -> dict:
    import torch

    from unigen.model import UniGen
    from unigen.scoring.world import evaluate_world, load_eval_split, scores_to_dicts

    torch.set_num_threads(2)
    results = {}
    split = load_eval_split(world, 32)
    for name, cfg in configs.items():
        model = UniGen.from_pretrained(os.path.join(cfg.run.output_dir, "final_model"))
        results[name] = scores_to_dicts(evaluate_world(model, split, world, k=8))
    results["qa_chance"] = _qa_chance(split)
    results["eval_images"] = len(split.keys)
    return results


def _table(results: dict, world) -> str:
    cols = ("i2t_contrastive", "t2i_contrastive", "i2t_rerank", "t2i_rerank", "qa_accuracy")
    head = ("| language | images in training | model | I→T R@1 (contrastive) | T→I R@1 (contrastive) "
            "| I→T R@1 ([match] re-ranked) | T→I R@1 ([match] re-ranked) | QA accuracy |")
    lines = [head, "|" + "---|" * 8]
    by_lang = {}
    for name in RUNS:
        for row in results[name]:
            by_lang.setdefault(row["language"], []).append((name, row))
    for lang in world.languages:
        rows = by_lang[lang]
        chance = rows[0][1]["chance"]
        seen = "yes" if rows[0][1]["with_images_in_training"] else "**no**"
        for name, row in rows:
            vals = " | ".join(f"{100 * row[c]:.0f}" for c in cols)
            lines.append(f"| {lang} | {seen} | {RUNS[name]} | {vals} |")
        lines.append(f"| {lang} | {seen} | chance | {100 * chance:.0f} | {100 * chance:.0f} | "
                     f"{100 * chance:.0f} | {100 * chance:.0f} | {100 * results['qa_chance']:.0f} |")
    return "\n".join(lines) + "\n"


@dataclass(kw_only=True)
class DemoConfig:
    """``python -m unigen.demo``'s settings (``--config FILE.yaml`` and ``--key=value``)."""

    out: str = "runs/demo"
    """Output folder."""
    steps: int = 3000
    """Optimizer steps per run."""
    batch_size: int = 48
    """Samples per step."""
    lr: float = 2e-3
    """Learning rate (constant after a short warm-up)."""
    images: int = 2000
    """Training images."""
    text_pairs: int = 2000
    """Translation pairs per non-English language."""
    eval_images: int = 200
    """Held-out images."""
    multilingual_fraction: float = 0.5
    """Share of [match]/L_CL pairs with a de/fr/ja caption (paper: 0.1)."""
    contrastive_weight: float = 0.02
    """Weight of L_CL (paper: 1; see the README for why the demo uses less)."""
    trans_ratio: float = 1.0
    """Share of translation samples relative to each other task."""
    seed: int = 0
    """Seeds the world, the tokenizers' corpus and both runs."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "images", "text_pairs", "eval_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.multilingual_fraction <= 1.0:
            raise ValueError(f"multilingual_fraction must be in [0, 1], got "
                             f"{self.multilingual_fraction}")
        for name in ("contrastive_weight", "trans_ratio", "lr"):
            value = getattr(self, name)
            if not (0 <= value < float("inf")) or (name == "lr" and value == 0):
                raise ValueError(f"{name} must be a finite "
                                 f"{'positive' if name == 'lr' else 'non-negative'} number, "
                                 f"got {value}")


def main(argv=None) -> int:
    from unigen.configuration import ConfigError, run_cli

    return run_cli(DemoConfig, _run, argv, prog="python -m unigen.demo", description=__doc__,
                   errors=(ConfigError, FileNotFoundError))


def _run(args: DemoConfig) -> None:
    from unigen.configuration import save_config

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    save_config(args, os.path.join(args.out, "demo.yaml"))
    print(f"[demo] writing the synthetic world and training tokenizers under {args.out}")
    world, tok = _write_inputs(args.out, args)
    print(f"[demo] languages with images: en {' '.join(world.image_languages)}; "
          f"only in translation pairs: {' '.join(world.text_only_languages)}")
    configs = {name: _train_config(name, world, tok, args.out, args) for name in RUNS}
    _clear_previous_runs(configs)
    print(f"[demo] pre-training {len(configs)} tiny models for {args.steps} steps each "
          f"(logs: {args.out}/<run>.log)")
    _train_both(configs, args.out, args.steps)
    _loss_curves(configs, os.path.join(args.out, "loss_curves.png"))
    print("[demo] evaluating on held-out images")
    results = _evaluate(configs, world)
    table = _table(results, world)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(f"\nR@1 and QA accuracy in %, {results['eval_images']} held-out images per language "
          f"(R@1 counts identical captions as hits; chance accordingly):\n")
    print(table)
    print(f"[demo] loss curves: {args.out}/loss_curves.png; table: {args.out}/results.md; "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
