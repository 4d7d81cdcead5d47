"""The questioner loop: read → shard → skip done → batch → generate → judge → append.

``run`` owns no resources; the CLI (or a test) builds the reader, backend and store and hands
them in, so every part can be swapped or driven in-process.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections import Counter
from dataclasses import dataclass

from .backends.base import Backend, Failure
from .errors import BackendError, UsageError
from .filters import PairFilter, judge_generation
from .prompt import PromptTemplate
from .readers import BadRecord, CaptionReader, CaptionRecord
from .summary import RunStats
from .writer import OutputStore, signals_deferred

_MAX_LOGGED_BAD_LINES = 10


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: this run handles the keys whose CRC32 is ``i`` modulo ``n``.

    Hashing the key (not counting lines) makes the split independent of input order and file
    list, so 8 GPUs, or several machines each given different files, never overlap.
    """

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, spec: str) -> "Shard":
        try:
            i, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise UsageError(f"--shard must look like i/n (e.g. 0/8), got {spec!r}") from None
        if n < 1 or not 0 <= i < n:
            raise UsageError(f"--shard {spec}: need n >= 1 and 0 <= i < n")
        return cls(i, n)

    def __contains__(self, key: str) -> bool:
        return self.count == 1 or zlib.crc32(key.encode("utf-8")) % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _log(msg: str, pbar) -> None:
    if pbar is not None:
        pbar.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def run(
    reader: CaptionReader,
    backend: Backend,
    store: OutputStore,
    *,
    template: PromptTemplate = PromptTemplate(),
    pair_filter: PairFilter = PairFilter(),
    shard: Shard = Shard(),
    batch_size: int | None = None,
    max_pairs: int = 1,
    stats: RunStats | None = None,
    progress: bool = True,
) -> RunStats:
    """Question every caption of ``reader`` in ``shard`` that ``store`` has not recorded yet."""
    batch_size = batch_size or backend.default_batch_size
    if batch_size < 1:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    if max_pairs < 1:
        raise UsageError(f"--max-pairs must be positive, got {max_pairs}")
    stats = stats if stats is not None else RunStats()
    start = time.perf_counter()
    pbar = None
    if progress:
        from tqdm import tqdm

        total = reader.count_lines()
        if total is not None and shard.count > 1:
            total = -(-total // shard.count)  # hashing splits evenly on average: an estimate
        pbar = tqdm(total=total, unit=" captions", dynamic_ncols=True, file=sys.stderr, smoothing=0.05)

    seen: set[str] = set()
    batch: list[CaptionRecord] = []

    def flush() -> None:
        prompts = [template.render(r.caption) for r in batch]
        generations = backend.generate(prompts, [r.caption for r in batch])
        if len(generations) != len(batch):
            raise BackendError(f"backend {backend.name} returned {len(generations)} generations "
                               f"for {len(batch)} prompts")
        results = []
        last_failure = None
        for rec, gen in zip(batch, generations):
            if isinstance(gen, Failure):
                if gen.retryable:
                    # Not recorded: the next run asks about this caption again.
                    stats.backend_errors[gen.reason] += 1
                    last_failure = gen
                    continue
                rejected = Counter({gen.reason: 1})
                results.append((rec.key, rec.caption, [], rejected))
            else:
                judged = judge_generation(rec.caption, gen, pair_filter, max_pairs)
                results.append((rec.key, rec.caption, judged.pairs, judged.rejected))
        if not results and last_failure is not None:
            # Every prompt of the batch failed: the backend is down, not one caption unlucky.
            raise BackendError(
                f"backend {backend.name}: all {len(batch)} requests of a batch failed; "
                f"last: {last_failure.reason} {last_failure.detail}".rstrip()
            )
        # A Ctrl-C/SIGTERM during the write lands after this block: the run's counts then
        # include the batch just written (nested in append's own deferral, it is held once).
        with signals_deferred():
            store.append(results)
            for _, _, pairs, rejected in results:
                stats.captions_generated += 1
                stats.kept += len(pairs)
                stats.rejected.update(rejected)
        if pbar is not None:
            pbar.update(len(batch))
            pbar.set_postfix(pairs=store.totals.kept, refresh=False)
        batch.clear()

    try:
        for rec in reader:
            stats.records += 1
            if rec.key not in shard:
                stats.other_shard += 1
                continue
            if isinstance(rec, BadRecord):
                stats.bad_lines[rec.reason] += 1
                n_bad = sum(stats.bad_lines.values())
                if n_bad <= _MAX_LOGGED_BAD_LINES:
                    more = "; further bad lines are only counted" if n_bad == _MAX_LOGGED_BAD_LINES else ""
                    _log(f"skipping bad line {rec.where}: {rec.reason}{more}", pbar)
                if pbar is not None:
                    pbar.update(1)
                continue
            if rec.key in store.done:
                stats.already_done += 1
                if pbar is not None:
                    pbar.update(1)
                continue
            if rec.key in seen:
                stats.duplicate_keys += 1
                if pbar is not None:
                    pbar.update(1)
                continue
            seen.add(rec.key)
            batch.append(rec)
            if len(batch) >= batch_size:
                flush()
        if batch:
            flush()
    finally:
        stats.elapsed_s += time.perf_counter() - start
        if pbar is not None:
            pbar.close()
    return stats
