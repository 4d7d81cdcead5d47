"""The paper's Table 1 from the few-shot runner's results folder
(``python -m unigen.iglue.fewshot``):

    python -m unigen.iglue.table --results runs/iglue/results --out runs/iglue/table

prints, and writes into the folder ``<out>`` as ``table.md`` and ``table.json``: Table 1 (zero-shot and few-shot rows;
XVNLI, xGQA, MaRVL accuracy, xFlickr&CO and WIT IR / TR R@1, each the mean over the task's target
languages, in %) and one per-language table per task (every setting and shot). The few-shot row
is each task's largest IGLUE shot (:data:`~unigen.iglue.protocol.TaskProtocol.headline_shot`),
as IGLUE reports it; when that shot was not run, the largest one present, said in a note. A mean
over fewer languages than the task's is marked ``*`` and noted; "-" is a cell not run.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from unigen.configuration import run_cli

from .protocol import PROTOCOLS, TABLE_TASKS
from .readers import RETRIEVAL_TASKS

# Table 1's columns: (task, metric key, header).
COLUMNS = (("xvnli", "accuracy", "XVNLI"), ("xgqa", "accuracy", "xGQA"),
           ("marvl", "accuracy", "MaRVL"), ("xflickrco", "ir_r1", "xFlickr&CO IR"),
           ("xflickrco", "tr_r1", "xFlickr&CO TR"), ("wit", "ir_r1", "WIT IR"),
           ("wit", "tr_r1", "WIT TR"))


@dataclass(kw_only=True)
class TableConfig:
    """Where the results are and where the tables go."""

    results: str
    """The ``results`` folder of ``python -m unigen.iglue.fewshot`` (``<task>/zero_shot/<lang>.json``,
    ``<task>/few_shot/<shot>/<lang>.json``)."""
    out: str = ""
    """A folder (made when missing) to write ``table.md`` and ``table.json`` into; "" = print
    only."""

    def __post_init__(self):
        if not isinstance(self.results, str) or not os.path.isdir(self.results):
            raise FileNotFoundError(f"table: results folder {self.results!r} is not a directory")
        if self.out and os.path.isfile(self.out):
            raise FileExistsError(f"table: out {self.out!r} is a file; it names the folder "
                                  f"table.md and table.json go into")


def _shot_order(shot: str) -> tuple[int, str]:
    m = re.match(r"\d+", shot)
    return (int(m.group()) if m else -1, shot)


def _read_setting(folder: str, where: str) -> dict[str, dict]:
    """{language: its result JSON} of one setting's folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(folder, name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"table: {path} is not JSON ({e.msg})") from None
        if not isinstance(data, dict) or not ("metrics" in data or "not_run" in data):
            raise ValueError(f"table: {path} is no result of python -m unigen.iglue.fewshot "
                             f"({where})")
        out[name[:-5]] = data
    return out


def read_results(root: str) -> dict[str, dict[str, dict[str, dict]]]:
    """{task: {setting: {language: result}}}, setting "zero_shot" or "few_shot/<shot>"."""
    out = {}
    for task in TABLE_TASKS:
        base = os.path.join(root, task)
        if not os.path.isdir(base):
            continue
        settings = {}
        if os.path.isdir(os.path.join(base, "zero_shot")):
            settings["zero_shot"] = _read_setting(os.path.join(base, "zero_shot"), task)
        few = os.path.join(base, "few_shot")
        if os.path.isdir(few):
            for shot in sorted(os.listdir(few), key=_shot_order):
                settings[f"few_shot/{shot}"] = _read_setting(os.path.join(few, shot), task)
        out[task] = settings
    if not out:
        raise FileNotFoundError(f"table: no task folder ({', '.join(TABLE_TASKS)}) in {root!r}")
    return out


def _mean(task: str, key: str, per_lang: dict[str, dict], notes: list[str], what: str):
    """Mean of ``key`` over the languages that were run, in %, or None."""
    values = [r["metrics"][key] for r in per_lang.values() if "metrics" in r]
    if not values:
        return None, ""
    expected = PROTOCOLS[task].few_shot_languages if what.startswith("few") else \
        PROTOCOLS[task].languages
    mark = ""
    if len(values) < len(expected):
        mark = "*"
        note = (f"{task} {what}: mean over {len(values)} of {len(expected)} languages "
                f"({', '.join(sorted(lang for lang, r in per_lang.items() if 'metrics' in r))})")
        if note not in notes:
            notes.append(note)
    return 100 * sum(values) / len(values), mark


def build_tables(results: dict) -> dict:
    """Table 1 and the per-language tables as plain data (``render_markdown`` prints them)."""
    notes: list[str] = []
    rows = {"zero_shot": {}, "few_shot": {}}
    shots_used = {}
    for task, settings in results.items():
        few = [s for s in settings if s.startswith("few_shot/")]
        if few:
            want = f"few_shot/{PROTOCOLS[task].headline_shot}"
            used = want if want in few else max(few, key=lambda s: _shot_order(s.split("/")[1]))
            if used != want:
                notes.append(f"{task} few-shot: IGLUE's {PROTOCOLS[task].headline_shot}-shot "
                             f"was not run; the row shows {used.split('/')[1]}-shot")
            shots_used[task] = used
    for task, key, header in COLUMNS:
        settings = results.get(task, {})
        for row, setting in (("zero_shot", "zero_shot"), ("few_shot", shots_used.get(task))):
            if setting is None or setting not in settings:
                rows[row][header] = None
                continue
            value, mark = _mean(task, key, settings[setting], notes, setting)
            rows[row][header] = None if value is None else {"value": value, "partial": bool(mark)}
    per_language = {}
    for task, settings in results.items():
        keys = ("ir_r1", "tr_r1") if task in RETRIEVAL_TASKS else ("accuracy",)
        langs = list(PROTOCOLS[task].languages)
        table = {}
        for setting, per_lang in settings.items():
            for key in keys:
                label = setting.replace("few_shot/", "few-shot ").replace("zero_shot", "zero-shot")
                if len(keys) > 1:
                    label += f" {'IR' if key == 'ir_r1' else 'TR'}"
                cells = {lang: (100 * per_lang[lang]["metrics"][key]
                                if lang in per_lang and "metrics" in per_lang[lang] else None)
                         for lang in langs}
                for lang, r in per_lang.items():
                    if "not_run" in r:
                        note = f"{task} {label} {lang}: not run: {r['not_run']}"
                        if note not in notes:
                            notes.append(note)
                value, _ = _mean(task, key, per_lang, notes, setting)
                cells["mean"] = value
                table[label] = cells
        per_language[task] = {"languages": langs, "rows": table}
    return {"table1": rows, "few_shot_setting": shots_used, "per_language": per_language,
            "notes": notes}


def _fmt(cell) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, dict):
        return f"{cell['value']:.2f}" + ("*" if cell["partial"] else "")
    return f"{cell:.2f}"


def render_markdown(tables: dict) -> str:
    headers = [h for _, _, h in COLUMNS]
    lines = ["## Table 1: IGLUE (accuracy; R@1 for retrieval, re-ranked; mean over languages, %)",
             "", "| setting | " + " | ".join(headers) + " |",
             "|---|" + "---:|" * len(headers)]
    for row, label in (("zero_shot", "zero-shot"), ("few_shot", "few-shot")):
        lines.append(f"| {label} | " + " | ".join(_fmt(tables["table1"][row][h])
                                                   for h in headers) + " |")
    for task, t in tables["per_language"].items():
        langs = t["languages"]
        lines += ["", f"### {task} per language (%)", "",
                  "| setting | " + " | ".join(langs) + " | mean |",
                  "|---|" + "---:|" * (len(langs) + 1)]
        for label, cells in t["rows"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(cells[lang]) for lang in langs)
                         + f" | {_fmt(cells['mean'])} |")
    if tables["notes"]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in tables["notes"]]
    return "\n".join(lines) + "\n"


TABLE_FILES = ("table.md", "table.json")


def render(cfg: TableConfig, *, log=print) -> dict:
    """Read ``cfg.results``, print the markdown, write ``<out>/table.md`` and
    ``<out>/table.json``."""
    results = read_results(cfg.results)
    log(f"[unigen.iglue.table] Table 1 from {cfg.results} ({', '.join(results)})"
        + (f" → {cfg.out}/" if cfg.out else ""))
    tables = build_tables(results)
    text = render_markdown(tables)
    log(text)
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        md, js = (os.path.join(cfg.out, name) for name in TABLE_FILES)
        with open(md, "w", encoding="utf-8") as f:
            f.write(text)
        with open(js, "w", encoding="utf-8") as f:
            json.dump(tables, f, indent=2)
        log(f"[unigen.iglue.table] wrote {md} and {js}")
    return tables


def main(argv: list[str] | None = None) -> int:
    return run_cli(TableConfig, render, argv, prog="python -m unigen.iglue.table",
                   description=__doc__, errors=(ValueError, FileNotFoundError, FileExistsError))


if __name__ == "__main__":
    import sys

    sys.exit(main())
