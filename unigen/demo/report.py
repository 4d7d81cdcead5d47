"""The demos' report: scores over seeds as mean ± standard deviation, the marks for differences
beyond the seed-to-seed spread, the markdown tables, and the pictures (loss curves per task, R@1
per language).

A difference is *beyond the spread* when the two settings' ranges over the seeds do not overlap:
every seed of one is above every seed of the other. With three seeds that is a strict test; a
difference that passes it is not an accident of one world or one initialisation.
"""

from __future__ import annotations

import statistics

METRICS = ("i2t_contrastive", "t2i_contrastive", "i2t_rerank", "t2i_rerank", "qa_accuracy")
METRIC_NAMES = {"i2t_contrastive": "I→T R@1 (contrastive)", "t2i_contrastive": "T→I R@1 (contrastive)",
                "i2t_rerank": "I→T R@1 ([match] re-ranked)", "t2i_rerank": "T→I R@1 ([match] re-ranked)",
                "qa_accuracy": "QA accuracy"}
LOSS_KEYS = ("loss/trans", "loss/cap", "loss/qus", "loss/match", "loss/cl")


def per_seed(scores: dict, setting: str, languages, metric: str) -> list[float]:
    """One value per seed (sorted): ``metric`` averaged over ``languages``, in %."""
    out = []
    for seed in sorted(scores[setting]):
        rows = {r["language"]: r for r in scores[setting][seed]}
        out.append(100.0 * statistics.fmean(rows[lang][metric] for lang in languages))
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def beyond_spread(a: list[float], b: list[float]) -> str:
    """"▲" when every value of ``a`` exceeds every value of ``b``, "▼" for the reverse, else ""
    (and "" with a single seed: there is no spread to compare with)."""
    if len(a) < 2 or len(b) < 2:
        return ""
    if min(a) > max(b):
        return "▲"
    if max(a) < min(b):
        return "▼"
    return ""


def cell(values: list[float], mark: str = "") -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.0f} ± {sd:.0f}" + (f" {mark}" if mark else "")


def chance_of(scores: dict, setting: str, lang: str) -> float:
    """R@1 chance for ``lang``, averaged over the seeds' worlds (it counts repeated captions)."""
    return statistics.fmean(next(r["chance"] for r in rows if r["language"] == lang)
                            for rows in scores[setting].values())


def comparison_table(scores: dict, names: dict, languages, image_languages, qa_chance: float,
                     *, against: str) -> str:
    """Per language, one row per setting of ``names`` (mean ± sd over seeds) and chance; cells of
    the other settings are marked where they differ from ``against`` beyond the spread."""
    head = ("| language | images in training | model | "
            + " | ".join(METRIC_NAMES[m] for m in METRICS) + " |")
    lines = [head, "|" + "---|" * (3 + len(METRICS))]
    for lang in languages:
        seen = "yes" if lang == "en" or lang in image_languages else "**no**"
        for setting, label in names.items():
            cells = []
            for m in METRICS:
                v = per_seed(scores, setting, [lang], m)
                mark = "" if setting == against else beyond_spread(
                    v, per_seed(scores, against, [lang], m))
                cells.append(cell(v, mark))
            lines.append(f"| {lang} | {seen} | {label} | {' | '.join(cells)} |")
        ch = 100 * chance_of(scores, against, lang)
        lines.append(f"| {lang} | {seen} | chance | " + " | ".join([f"{ch:.0f}"] * 4)
                     + f" | {100 * qa_chance:.0f} |")
    return "\n".join(lines) + "\n"


def loss_curves(metrics: dict, names: dict, path: str) -> None:
    """One panel per task loss: each setting's mean over seeds, shaded between the seeds'
    lowest and highest value at each logged step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(LOSS_KEYS), figsize=(3.6 * len(LOSS_KEYS), 3.2))
    for setting, label in names.items():
        by_step: dict = {}
        for rows in metrics[setting].values():
            for r in rows:
                for key in LOSS_KEYS:
                    if r.get(key) is not None:
                        by_step.setdefault(key, {}).setdefault(r["step"], []).append(r[key])
        for ax, key in zip(axes, LOSS_KEYS):
            if key not in by_step:
                continue
            steps = sorted(by_step[key])
            vals = [by_step[key][s] for s in steps]
            line, = ax.plot(steps, [statistics.fmean(v) for v in vals], label=label, lw=1.2)
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                            color=line.get_color(), alpha=0.2, lw=0)
    for ax, key in zip(axes, LOSS_KEYS):
        ax.set_title(f"L_{key.split('/')[-1]}")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recall_bars(scores: dict, names: dict, languages, path: str,
                metrics=("i2t_contrastive", "t2i_contrastive", "i2t_rerank", "t2i_rerank")) -> None:
    """Per language, R@1 of each setting (bar: mean over seeds; whisker: ± sd) and chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting0 = next(iter(names))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), sharey=True)
    width = 0.8 / (len(names) + 1)
    for ax, m in zip(axes, metrics):
        for i, (setting, label) in enumerate(names.items()):
            stats = [mean_sd(per_seed(scores, setting, [lang], m)) for lang in languages]
            xs = [j + (i - len(names) / 2) * width for j in range(len(languages))]
            ax.bar(xs, [s[0] for s in stats], width, yerr=[s[1] for s in stats], capsize=2,
                   label=label)
        xs = [j + (len(names) / 2) * width for j in range(len(languages))]
        ax.bar(xs, [100 * chance_of(scores, setting0, lang) for lang in languages], width,
               color="black", label="chance")
        ax.set_xticks(range(len(languages)), languages)
        ax.set_title(METRIC_NAMES[m], fontsize=9)
    axes[0].set_ylabel("R@1 (%)")
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
