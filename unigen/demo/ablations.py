"""`make demo-ablations`: the paper's Table 2 in miniature. The demo's UniGen and the ablation
rows of Table 2 — without multilingual captions (CC6L), without QA (CCQA), without both, and
without both and the contrastive loss — trained on the synthetic world over several seeds,
each row switched by the preset file a paper-scale ablation uses (``configs/ablations/*.yaml``,
their sections other than ``extends`` and ``run`` merged over the demo's config).

Writes ``<out>/table2.md`` (the rows, mean ± sd over seeds; each row's change against the full
model next to the paper's change, and whether the direction reproduces), ``<out>/results.json``,
``<out>/recall.png`` and ``<out>/loss_curves.png``.

    python -m unigen.demo.ablations [--out runs/demo_ablations] [--seeds 0,1,2,3,4] [--steps 1000]
        (every key: python -m unigen.demo.ablations --help; the demo's keys apply)
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import yaml

from unigen.demo.pretrain import DemoConfig
from unigen.demo.report import beyond_spread, cell, mean_sd, per_seed

PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs", "ablations")
# (setting, Table 2's row name, its preset file or None for the full model)
ROWS = (("full", "Ours (every task and source)", None),
        ("no_cc6l", "-w/o CC6L", "no_cc6l.yaml"),
        ("no_ccqa", "-w/o CCQA3M", "no_ccqa.yaml"),
        ("no_ccqa_cc6l", "-w/o CCQA3M+CC6L", "no_ccqa_cc6l.yaml"),
        ("no_ccqa_cc6l_cl", "-w/o CCQA3M+CC6L+CL", "no_ccqa_cc6l_cl.yaml"))
# The paper's Table 2 (XVNLI, xGQA, MaRVL, xFlickr&CO IR, TR), as printed.
PAPER = {"full": (75.02, 45.33, 67.13, 62.59, 60.50),
         "no_cc6l": (74.80, 44.47, 64.86, 60.58, 58.12),
         "no_ccqa": (75.17, 43.92, 66.91, 58.26, 58.07),
         "no_ccqa_cc6l": (74.45, 43.41, 64.49, 57.20, 56.88),
         "no_ccqa_cc6l_cl": (67.38, 40.31, 62.10, 50.08, 47.22)}
PAPER_COLUMNS = ("XVNLI", "xGQA", "MaRVL", "xFlickr&CO IR", "xFlickr&CO TR")
# What each miniature column stands in for: (our column, its metric, the paper's column index)
ANALOGUES = (("QA", "qa_accuracy", 1), ("IR", "t2i_rerank", 3), ("TR", "i2t_rerank", 4))


def preset_switches(filename: str) -> dict:
    """A preset file's own sections, without ``extends`` (the paper-scale base) and ``run``."""
    path = os.path.join(PRESETS, filename)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ablation preset {path!r} not found (make demo-ablations runs "
                                f"from the repository, where configs/ablations/ lives)")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    return {k: v for k, v in data.items() if k not in ("extends", "run")}


@dataclass(kw_only=True)
class AblationsConfig(DemoConfig):
    """``python -m unigen.demo.ablations``'s settings: the demo's, five seeds by default."""

    out: str = "runs/demo_ablations"
    """Output folder."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """One world and one initialisation per seed; each seed trains every row."""


def _groups(world) -> dict:
    others = tuple(lang for lang in world.languages if lang != "en")
    return {"en": ("en",), "non-English": others, "image langs": tuple(world.image_languages),
            "image-free": tuple(world.text_only_languages)}


def rows_table(scores: dict, world) -> str:
    """Table 2's shape: one row per setting; QA and [match]-re-ranked R@1 by language group."""
    g = _groups(world)
    cols = [("QA en", "qa_accuracy", g["en"]), ("QA de–sw", "qa_accuracy", g["non-English"]),
            (f"IR {'/'.join(g['image langs'])}", "t2i_rerank", g["image langs"]),
            (f"TR {'/'.join(g['image langs'])}", "i2t_rerank", g["image langs"]),
            (f"IR {'/'.join(g['image-free'])}", "t2i_rerank", g["image-free"]),
            (f"TR {'/'.join(g['image-free'])}", "i2t_rerank", g["image-free"])]
    lines = ["| setting | " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for setting, name, _ in ROWS:
        lines.append(f"| {name} | " + " | ".join(
            cell(per_seed(scores, setting, langs, m)) for _, m, langs in cols) + " |")
    return "\n".join(lines) + "\n"


def directions_table(scores: dict, world) -> tuple[str, list]:
    """Each row's change against the full model (non-English languages: the IGLUE zero-shot
    setting), ours (mean ± sd of the per-seed differences) beside the paper's; returns the
    table and the verdicts as ``(row, column, verdict)``."""
    langs = _groups(world)["non-English"]
    head = "| setting | " + " | ".join(f"Δ{c} ours | Δ{PAPER_COLUMNS[i]} paper | direction"
                                        for c, _, i in ANALOGUES) + " |"
    lines = [head, "|" + "---|" * (1 + 3 * len(ANALOGUES))]
    verdicts = []
    for setting, name, _ in ROWS[1:]:
        cells = []
        for col, metric, i in ANALOGUES:
            full = per_seed(scores, "full", langs, metric)
            row = per_seed(scores, setting, langs, metric)
            diffs = [r - f for r, f in zip(row, full)]
            mean, sd = mean_sd(diffs)
            paper = PAPER[setting][i] - PAPER["full"][i]
            mark = beyond_spread(row, full)
            if mark and (mark == "▲") == (paper > 0):
                verdict = "reproduces"
            elif mark:
                verdict = "opposite"
            else:
                verdict = ("same sign, within spread" if (mean > 0) == (paper > 0)
                           else "opposite sign, within spread")
            verdicts.append((name, col, verdict))
            cells += [f"{mean:+.1f} ± {sd:.1f}{(' ' + mark) if mark else ''}", f"{paper:+.2f}",
                      verdict]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", verdicts


def paper_table() -> str:
    lines = ["| setting (paper, Table 2) | " + " | ".join(PAPER_COLUMNS) + " |",
             "|" + "---|" * (len(PAPER_COLUMNS) + 1)]
    names = {"full": "Ours -w/ 10% CC6L", **{s: n for s, n, _ in ROWS[1:]}}
    for setting, values in PAPER.items():
        lines.append(f"| {names[setting]} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from unigen.configuration import ConfigError, run_cli

    return run_cli(AblationsConfig, _run, argv, prog="python -m unigen.demo.ablations",
                   description=__doc__, errors=(ConfigError, FileNotFoundError))


def _run(args: AblationsConfig) -> None:
    from unigen.configuration import save_config
    from unigen.demo import report
    from unigen.demo.pretrain import prepare_runs
    from unigen.demo.runs import clear_previous, read_metrics, read_scores, train_and_score

    start = time.perf_counter()
    settings = {s: (preset_switches(f) if f else {}) for s, _, f in ROWS}
    names = {s: n for s, n, _ in ROWS}
    os.makedirs(args.out, exist_ok=True)
    save_config(args, os.path.join(args.out, "ablations.yaml"))
    runs, world = prepare_runs(args, settings, args.out)
    clear_previous(runs)
    print(f"[demo-ablations] {len(runs)} runs: {len(ROWS)} settings x seeds "
          f"{', '.join(map(str, args.seeds))}, {args.steps} steps each")
    train_and_score(runs, parallel=args.parallel, desc="Table 2 rows")
    scores, metrics = read_scores(runs), read_metrics(runs)
    rows = rows_table(scores, world)
    directions, verdicts = directions_table(scores, world)
    seeds = ", ".join(map(str, args.seeds))
    text = (f"Mean ± sd over seeds {seeds}, in %; R@1 after [match] re-ranking of the "
            f"contrastive top 8, {args.eval_images} held-out images per language.\n\n{rows}\n"
            f"Change against the full model, non-English languages (▲/▼: the ranges over the "
            f"seeds do not overlap):\n\n{directions}\nThe paper's rows:\n\n{paper_table()}")
    report.loss_curves(metrics, names, os.path.join(args.out, "loss_curves.png"))
    report.recall_bars(scores, names, world.languages, os.path.join(args.out, "recall.png"),
                       metrics=("t2i_rerank", "i2t_rerank"))
    with open(os.path.join(args.out, "table2.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seeds": list(args.seeds), "scores": scores, "verdicts": verdicts,
                   "presets": {s: f for s, _, f in ROWS}}, f, indent=1)
    print("\n" + text)
    print(f"[demo-ablations] {args.out}/table2.md, recall.png, loss_curves.png; total "
          f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
