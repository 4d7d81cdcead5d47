"""The loss curve of a run as a picture (``<output_dir>/loss_curve.png``), drawn at its end.

``metrics.jsonl`` and TensorBoard hold the same numbers; the picture is what a person opens
first after a run on a machine without a TensorBoard server. Drawn with matplotlib when it is
installed (it is in the test and demo dependencies, not in the package's own): without it the
run's summary says so and nothing else changes.
"""

from __future__ import annotations

import math

LOSS_CURVE = "loss_curve.png"


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def _smooth(values: list, window: int) -> tuple[list[int], list[float]]:
    """Indices and running means over ``window`` steps of the finite values (None skipped):
    per-step losses of small batches are noisy, the trend is what a glance should show."""
    xs, ys, kept = [], [], []
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        kept.append(v)
        if len(kept) > window:
            kept.pop(0)
        xs.append(i)
        ys.append(sum(kept) / len(kept))
    return xs, ys


def write_loss_curve(history: dict[str, list], columns: tuple[str, ...], path: str,
                     *, title: str = "") -> str | None:
    """Draw ``history["loss"]`` (the objective) and the ``columns`` (per-task losses) against
    ``history["step"]`` into ``path`` (PNG); returns the path, or None without matplotlib or
    without a step to draw."""
    steps = history.get("step") or []
    if not steps or not matplotlib_available():
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    window = max(1, min(25, len(steps) // 20))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    xs, ys = _smooth(history.get("loss", []), window)
    top.plot([steps[i] for i in xs], ys, color="black", label="objective")
    top.set_ylabel("objective L")
    for name in columns:
        xs, ys = _smooth(history.get(name, []), window)
        if xs:
            bottom.plot([steps[i] for i in xs], ys, label=name)
    bottom.set_ylabel("loss per task")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper right", fontsize="small")
    note = f" (running mean over {window} steps)" if window > 1 else ""
    fig.suptitle((title or "training loss") + note)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
