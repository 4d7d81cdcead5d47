"""`make demo`: pre-train tiny UniGens on the embedded synthetic multilingual world, over several
seeds, against an ablation without translation pairs, and measure what crosses over to the
languages that never met an image.

1. pre-trains a tiny CLIP on English image-caption pairs of a world of its own
   (:mod:`unigen.demo.tiny_clip`): the stand-in for the paper's pre-trained CLIP ViT, which
   every run starts from, frozen;
2. per seed, writes the synthetic world (unigen.data.synthetic_world) in the real file formats —
   webdataset image shards with English captions, CC6L captions in de/fr/ja, CCQA questions,
   WikiMatrix translation pairs for every language; ``es`` and ``sw`` occur *only* in
   translation pairs — and trains the tiny tokenizers on its text;
3. per seed, pre-trains UniGen (every task) and the ablation (the same config without the
   translation pairs) with ``python -m unigen.train``, two runs at a time on one thread each,
   and scores each on held-out images with captions and questions in every language
   (``python -m unigen.scoring.world``): image→text and text→image R@1 by contrastive
   similarity and after [match] re-ranking of the contrastive top-k, and QA accuracy;
4. prints the table (mean ± sd over the seeds, next to chance; ▲/▼ where UniGen's range over
   the seeds lies entirely above/below the ablation's), saves it (JSON and markdown), the loss
   curves and a per-language R@1 chart (PNG).

    python -m unigen.demo [--config FILE.yaml] [--out runs/demo] [--seeds 0,1,2] [--steps 1000]
        (every key: python -m unigen.demo --help)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

SETTINGS = {"unigen": "UniGen (all tasks)", "no_translation": "ablation: no translation pairs"}


def switches(args) -> dict:
    """Each setting's config changes, in a preset file's form (configs/ablations/ has the
    paper's rows; the paper has no row without translation pairs, its method's point). The
    ablation drops the translation pairs and their places in the batch, nothing else."""
    return {"unigen": {},
            "no_translation": {"data": {"wikimatrix": [], "ratios": {"trans": 0.0},
                                        "batch_size": args.batch_size}}}


def write_world(out: str, seed: int, args) -> tuple:
    """One seed's world and the tiny tokenizers trained on its text."""
    from unigen.data.synthetic_world import all_texts, write_synthetic_world
    from unigen.model.tokenizers import train_tiny_tokenizers

    world = write_synthetic_world(os.path.join(out, "world"), num_images=args.images,
                                  num_text_pairs=args.text_pairs, num_eval_images=args.eval_images,
                                  image_size=32, max_objects=1, seed=seed)
    tok = train_tiny_tokenizers(all_texts(world), os.path.join(out, "tokenizers"))
    return world, tok


def pretrain_clip(out: str, args) -> str:
    """The tiny CLIP every run starts from, trained on a world of its own (``clip_seed``): like
    the paper's CLIP, it has seen other images than the runs' (unigen.demo.tiny_clip)."""
    import torch

    from unigen.data.synthetic_world import write_synthetic_world
    from unigen.demo.runs import demo_vision
    from unigen.demo.tiny_clip import train_tiny_clip

    world = write_synthetic_world(os.path.join(out, "clip", "world"), num_images=args.images,
                                  num_text_pairs=1, num_eval_images=args.eval_images,
                                  image_size=32, max_objects=1, seed=args.clip_seed)
    vision = demo_vision(frozen=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.parallel)
    try:
        info = train_tiny_clip(world.image_shards, os.path.join(out, "clip", "model"),
                               vision=vision, steps=args.clip_steps, seed=args.clip_seed,
                               eval_shards=world.eval_image_shards)
    finally:
        torch.set_num_threads(threads)
    print(f"[demo] tiny CLIP: {info['steps']} steps in {info['seconds']:.0f} s, final loss "
          f"{info['final_loss']:.3f}, English I→T R@1 on its held-out images "
          f"{100 * info['eval_i2t_r1']:.0f}%")
    return os.path.join(out, "clip", "model")


def qa_chance(world) -> float:
    """Expected accuracy of a uniform guess among the answers of each question's kind."""
    from unigen.data.synthetic_world import COLOURS, LEXICONS, POSITIONS, SHAPES

    options = {**{c: len(COLOURS) for c in COLOURS}, **{s: len(SHAPES) for s in SHAPES},
               **{LEXICONS["en"].positions[p]: len(POSITIONS) for p in POSITIONS}}
    with open(world.eval_qa, encoding="utf-8") as f:
        answers = [json.loads(line)["answer"] for line in f]
    return sum(1.0 / options[a] for a in answers) / len(answers)


def prepare_runs(args, settings: dict, out: str) -> tuple[list, object]:
    """The tiny CLIP, every seed's world, and one :class:`~unigen.demo.runs.Run` per (seed,
    setting); returns (runs, the first seed's world)."""
    from unigen.demo.runs import Run, base_config, with_switches

    clip_dir = pretrain_clip(out, args)
    runs, first = [], None
    for seed in args.seeds:
        seed_dir = os.path.join(out, f"seed{seed}")
        world, tok = write_world(seed_dir, seed, args)
        first = first or world
        for setting, switches in settings.items():
            base = base_config(world, tok, os.path.join(seed_dir, setting), args,
                               clip_dir=clip_dir, seed=seed)
            runs.append(Run(setting, seed, with_switches(base, switches), world.root))
    return runs, first


@dataclass(kw_only=True)
class DemoConfig:
    """``python -m unigen.demo``'s settings (``--config FILE.yaml`` and ``--key=value``)."""

    out: str = "runs/demo"
    """Output folder."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One world and one initialisation per seed; each seed trains every setting."""
    steps: int = 1000
    """Optimizer steps per run."""
    batch_size: int = 48
    """Image-task samples per step (captioning, QA, [match]/L_CL); UniGen's batch adds the
    translation pairs (``trans_ratio`` × each image task's share: 16 by default)."""
    lr: float = 2e-3
    """Learning rate (constant after a short warm-up)."""
    images: int = 2000
    """Training images per world."""
    text_pairs: int = 2000
    """Translation pairs per non-English language."""
    eval_images: int = 200
    """Held-out images."""
    multilingual_fraction: float = 0.5
    """Share of [match]/L_CL pairs with a de/fr/ja caption (paper: 0.1)."""
    contrastive_weight: float = 0.02
    """Weight of L_CL (paper: 1; see docs/demo.md for why the demo uses less)."""
    trans_ratio: float = 1.0
    """Share of translation samples relative to each other task."""
    clip_steps: int = 300
    """Steps of the tiny CLIP every run starts from."""
    clip_seed: int = 1000
    """Seeds the tiny CLIP's own world and its training."""
    parallel: int = 2
    """Runs trained at a time (one thread each)."""

    def __post_init__(self):
        from unigen.configuration import check_int, check_number

        owner = "demo"  # the command, as other entry points name theirs
        for name in ("steps", "batch_size", "images", "text_pairs", "eval_images", "clip_steps",
                     "parallel"):
            check_int(owner, name, getattr(self, name))
        self.seeds = tuple(self.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"{owner}.seeds must be distinct and at least one, got {self.seeds}")
        check_number(owner, "multilingual_fraction", self.multilingual_fraction, low=0.0, high=1.0)
        check_number(owner, "contrastive_weight", self.contrastive_weight, low=0.0)
        check_number(owner, "trans_ratio", self.trans_ratio, low=0.0)
        check_number(owner, "lr", self.lr, low=0.0, low_open=True)


def main(argv=None) -> int:
    from unigen.configuration import ConfigError, run_cli

    return run_cli(DemoConfig, _run, argv, prog="python -m unigen.demo", description=__doc__,
                   errors=(ConfigError, FileNotFoundError))


def _final_losses(metrics: dict) -> dict:
    """{setting: {task: mean over seeds of the last logged value}}."""
    from unigen.demo.report import LOSS_KEYS

    out = {}
    for setting, by_seed in metrics.items():
        out[setting] = {}
        for key in LOSS_KEYS:
            last = [next((r[key] for r in reversed(rows) if r.get(key) is not None), None)
                    for rows in by_seed.values()]
            if None not in last:
                out[setting][key] = statistics.fmean(last)
    return out


def _run(args: DemoConfig) -> None:
    from unigen.configuration import save_config
    from unigen.demo import report
    from unigen.demo.runs import clear_previous, read_metrics, read_scores, train_and_score

    start = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    save_config(args, os.path.join(args.out, "demo.yaml"))
    print(f"[demo] pre-training the tiny CLIP, then writing {len(args.seeds)} worlds under "
          f"{args.out}; on the CPU, {args.parallel} runs at a time (one thread each), "
          f"{args.steps} steps of {args.batch_size}+ samples per run")
    runs, world = prepare_runs(args, switches(args), args.out)
    print(f"[demo] languages with images: en {' '.join(world.image_languages)}; "
          f"only in translation pairs: {' '.join(world.text_only_languages)}")
    clear_previous(runs)
    print(f"[demo] pre-training {len(runs)} tiny models ({len(SETTINGS)} settings x seeds "
          f"{', '.join(map(str, args.seeds))}) for {args.steps} steps each "
          f"(logs: {args.out}/seed<N>/<setting>/demo.log)")
    train_and_score(runs, parallel=args.parallel)
    scores, metrics = read_scores(runs), read_metrics(runs)
    chance = qa_chance(world)
    table = report.comparison_table(scores, SETTINGS, world.languages, world.image_languages,
                                    chance, against="no_translation")
    report.loss_curves(metrics, SETTINGS, os.path.join(args.out, "loss_curves.png"))
    report.recall_bars(scores, SETTINGS, world.languages, os.path.join(args.out, "recall.png"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seeds": list(args.seeds), "scores": scores, "qa_chance": chance,
                   "final_losses": _final_losses(metrics)}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(f"\nR@1 and QA accuracy in %, mean ± sd over seeds {', '.join(map(str, args.seeds))}; "
          f"{args.eval_images} held-out images per language (R@1 counts identical captions as "
          f"hits; chance accordingly); ▲/▼: UniGen above/below the ablation in every seed:\n")
    print(table)
    print(f"[demo] pictures: {args.out}/loss_curves.png, {args.out}/recall.png; table: "
          f"{args.out}/results.md; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
