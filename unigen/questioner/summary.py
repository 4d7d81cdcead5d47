"""The run summary: what was kept, what was rejected and why, printed and written beside OUT.

Two scopes. ``total`` covers every caption recorded in the ledger, i.e. all runs that built this
output file together, so a resumed run still reports the whole file. ``this_run`` covers the
invocation that just ended: input lines read, bad lines, captions skipped as another shard's or
as already done, backend errors, time and throughput.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .writer import Totals


@dataclass
class RunStats:
    records: int = 0
    bad_lines: Counter = field(default_factory=Counter)
    other_shard: int = 0
    already_done: int = 0
    duplicate_keys: int = 0
    captions_generated: int = 0
    kept: int = 0
    rejected: Counter = field(default_factory=Counter)
    backend_errors: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0


def _sorted(counter: Counter) -> dict:
    return {k: counter[k] for k in sorted(counter, key=lambda k: (-counter[k], str(k)))}


def build_summary(status: str, header: dict, totals: Totals, stats: RunStats) -> dict:
    per_caption = {str(k): totals.pairs_per_caption[k] for k in sorted(totals.pairs_per_caption)}
    with_pairs = totals.captions - totals.pairs_per_caption.get(0, 0)
    return {
        "status": status,
        "run": header,
        "total": {
            "captions": totals.captions,
            "captions_with_pairs": with_pairs,
            "pairs_kept": totals.kept,
            "pairs_rejected": sum(totals.rejected.values()),
            "rejected": _sorted(totals.rejected),
            "pairs_per_caption": per_caption,
            "mean_pairs_per_caption": round(totals.kept / totals.captions, 4) if totals.captions else 0.0,
        },
        "this_run": {
            "records_read": stats.records,
            "bad_lines": _sorted(stats.bad_lines),
            "other_shard": stats.other_shard,
            "already_done": stats.already_done,
            "duplicate_keys": stats.duplicate_keys,
            "captions_generated": stats.captions_generated,
            "pairs_kept": stats.kept,
            "rejected": _sorted(stats.rejected),
            "backend_errors": _sorted(stats.backend_errors),
            "elapsed_s": round(stats.elapsed_s, 3),
            "captions_per_s": round(stats.captions_generated / stats.elapsed_s, 3) if stats.elapsed_s > 0 else 0.0,
        },
    }


def write_summary(path: Path, summary: dict) -> None:
    # Write-then-rename: a reader (or a crash) never sees a half-written summary.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    t, r = summary["total"], summary["this_run"]

    def counts(d: dict) -> str:
        return ", ".join(f"{k}={v}" for k, v in d.items()) or "none"

    lines = [
        f"questioner {summary['status']}: backend={summary['run'].get('backend')} "
        f"prompt={summary['run'].get('prompt_version')} shard={summary['run'].get('shard')}",
        f"  this run: {r['records_read']} lines read, {r['captions_generated']} captions generated "
        f"({r['captions_per_s']:.1f}/s), {r['pairs_kept']} pairs kept; skipped: "
        f"{r['already_done']} already done, {r['other_shard']} other shards, "
        f"{r['duplicate_keys']} duplicate keys",
        f"  bad lines: {counts(r['bad_lines'])}",
        f"  backend errors (asked again next run): {counts(r['backend_errors'])}",
        f"  total: {t['captions']} captions, {t['pairs_kept']} pairs kept "
        f"({t['captions_with_pairs']} captions with pairs), {t['pairs_rejected']} rejected",
        f"  rejected: {counts(t['rejected'])}",
        f"  pairs per caption: {counts(t['pairs_per_caption'])}",
    ]
    return "\n".join(lines)
