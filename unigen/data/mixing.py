"""Task mixing: one stream of samples drawn from the four task streams by ratio (paper §3.3).

``L = L_trans + L_cap + α·L_qus + β·L_match + L_CL`` is computed on batches that mix the
tasks; which task the next sample comes from is drawn here, deterministically from a seed:

* ``mode="random"``: i.i.d. draws with probabilities proportional to the ratios;
* ``mode="interleave"``: smooth weighted round-robin — no randomness, every window of
  ``sum(ratios)`` draws (for integer ratios) holds each task exactly ``ratio`` times, so every
  batch sees every task.

Resuming: :meth:`TaskMixer.state_dict` holds the draw state and each stream's position;
:meth:`TaskMixer.fast_forward` replays a number of samples instead. In DataLoader workers the
streams live in the worker processes, so each batch carries its worker's state out to the
trainer (:class:`MixedTaskDataset`, :class:`DataPosition`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Mapping

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from unigen.model.config import TASK_NAMES

from .sharding import ShardSpec, distributed_rank_world

MODES = ("random", "interleave")


def validate_ratios(ratios: Mapping[str, float], known=TASK_NAMES) -> dict[str, float]:
    """Non-negative ratios over known tasks, at least one positive; zero ratios dropped."""
    out = {}
    for task, r in ratios.items():
        if task not in known:
            raise ValueError(f"unknown task {task!r} in ratios; tasks are {list(known)}")
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not np.isfinite(r) or r < 0:
            raise ValueError(f"ratio of task {task!r} must be a finite number >= 0, got {r!r}")
        if r > 0:
            out[task] = float(r)
    if not out:
        raise ValueError(f"at least one task ratio must be positive, got {dict(ratios)}")
    return out


def interleave_max_gap(ratios: Mapping[str, float], task: str, draws: int = 10_000) -> int:
    """The most consecutive draws of ``mode="interleave"`` that hold ``task`` at most once
    from the start, i.e. the longest span to wait for it: every window of that many draws
    (a batch of that size, wherever it starts) holds ``task``. Measured over ``draws`` draws
    of the deterministic order (exact for integer ratios, whose order repeats every
    ``sum(ratios)`` draws)."""
    mixer = TaskMixer({t: () for t in ratios}, ratios, mode="interleave")
    if task not in mixer.ratios:
        raise ValueError(f"task {task!r} has no positive ratio in {dict(ratios)}")
    last, gap = -1, 0
    for i, t in enumerate(mixer.draw_tasks(draws)):
        if t == task:
            gap, last = max(gap, i - last), i
    return max(gap, draws - last)


class TaskMixer:
    """Draws samples from ``streams`` (task → iterable of samples) by ``ratios``.

    Every stream whose ratio is positive must be endless (``epochs=None``): a mixer that ran
    one task dry would silently change the ratios, so an exhausted stream is an error.
    """

    def __init__(self, streams: Mapping[str, object], ratios: Mapping[str, float], *,
                 seed: int = 0, mode: str = "random"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.ratios = validate_ratios(ratios, known=tuple(streams) or TASK_NAMES)
        missing = [t for t in self.ratios if t not in streams]
        if missing:
            raise ValueError(f"tasks {missing} have a ratio but no stream")
        self.streams = dict(streams)
        self.tasks = tuple(t for t in TASK_NAMES if t in self.ratios) + tuple(
            t for t in self.ratios if t not in TASK_NAMES)
        self.mode = mode
        self.seed = int(seed)
        w = np.array([self.ratios[t] for t in self.tasks], dtype=np.float64)
        self._p = w / w.sum()
        self._weights = w
        self.reset_draws()
        self._iters: dict[str, Iterator] = {}

    def reset_draws(self) -> None:
        self._rng = np.random.default_rng([self.seed, 0x6D6978])  # "mix"
        self._current = np.zeros(len(self.tasks))
        self.drawn = 0
        self.counts = {t: 0 for t in self.tasks}

    def _draw(self) -> str:
        if self.mode == "random":
            i = int(self._rng.choice(len(self.tasks), p=self._p))
        else:
            self._current += self._weights
            i = int(np.argmax(self._current))  # ties: the earlier task in TASK_NAMES order
            self._current[i] -= self._weights.sum()
        self.drawn += 1
        task = self.tasks[i]
        self.counts[task] += 1
        return task

    def draw_tasks(self, n: int) -> list[str]:
        """The next ``n`` task draws (advances the draw state, pulls no sample)."""
        return [self._draw() for _ in range(n)]

    def _next_from(self, task: str) -> dict:
        it = self._iters.get(task)
        if it is None:
            it = self._iters[task] = iter(self.streams[task])
        try:
            return next(it)
        except StopIteration:
            raise RuntimeError(f"the {task!r} stream ran out after {self.counts[task] - 1} "
                               f"samples; task streams must be endless (epochs=None)") from None

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self._next_from(self._draw())

    def fast_forward(self, n: int) -> None:
        """Skip the next ``n`` samples exactly as iterating would (they are read and dropped)."""
        for task in self.draw_tasks(n):
            self._next_from(task)

    def state_dict(self) -> dict:
        streams = {}
        for t in self.tasks:
            if not hasattr(self.streams[t], "state_dict"):
                raise TypeError(f"the {t!r} stream has no state_dict(); use fast_forward()")
            streams[t] = self.streams[t].state_dict()
        return {"drawn": self.drawn, "counts": dict(self.counts),
                "rng": copy.deepcopy(self._rng.bit_generator.state),
                "current": self._current.tolist(), "streams": streams}

    def load_state_dict(self, state: dict) -> None:
        for key in ("drawn", "counts", "rng", "current", "streams"):
            if key not in state:
                raise KeyError(f"TaskMixer state has no {key!r}")
        if sorted(state["streams"]) != sorted(self.tasks):
            raise ValueError(f"state is for tasks {sorted(state['streams'])}, this mixer has "
                             f"{sorted(self.tasks)}")
        self.drawn = int(state["drawn"])
        self.counts = dict(state["counts"])
        self._rng.bit_generator.state = copy.deepcopy(state["rng"])
        self._current = np.asarray(state["current"], dtype=np.float64)
        for t in self.tasks:
            self.streams[t].load_state_dict(state["streams"][t])
        self._iters = {}  # fresh iterators start from the restored positions


class MixedTaskDataset(IterableDataset):
    """An endless ``IterableDataset`` of mixed batches.

    ``build_streams(shard)`` makes this process's task streams for its shard (rank × worker);
    each worker mixes its own streams and yields ``collate(list_of_batch_size_samples)``.
    Use with ``DataLoader(dataset, batch_size=None, num_workers=W)``.

    Resuming. The DataLoader takes batches from its workers round-robin, so after the trainer
    has consumed ``n`` batches, worker ``w`` has contributed ``ceil((n - w) / W)`` of them. A
    restarted DataLoader asks worker 0 first, so each new worker takes over the *role* (shard
    and count) of the old worker whose turn is next. Two ways to restore a role's position:

    * exact and O(1): when ``collate`` returns a dict (or an object with a ``data_state``
      attribute, such as :class:`~unigen.data.batches.LoaderBatch`), every batch carries ``"data_state"``
      (the role's mixer and stream positions after that batch). Feed each consumed batch to a
      :class:`DataPosition`, save its ``state_dict()``, and give it back to
      :meth:`load_state_dict`;
    * from a count only: :meth:`set_position` ``(n)``; each worker replays (reads, does not
      decode or tokenise) the samples of its share.

    Either way keep ``num_workers``, ``batch_size``, ratios and data the same as the
    interrupted run.
    """

    def __init__(self, build_streams: Callable[[ShardSpec], Mapping[str, object]],
                 ratios: Mapping[str, float], *, batch_size: int, seed: int = 0,
                 mode: str = "random", collate: Callable[[list[dict]], object] | None = None,
                 transform: Callable[[dict], dict] | None = None,
                 rank: int | None = None, world_size: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.build_streams = build_streams
        self.ratios = validate_ratios(ratios)
        self.batch_size = batch_size
        self.seed = seed
        self.mode = mode
        self.collate = collate
        self.transform = transform
        self.rank, self.world_size = rank, world_size
        self.batches_consumed = 0
        self.worker_states: dict[int, dict] = {}

    def set_position(self, batches_consumed: int) -> None:
        if not isinstance(batches_consumed, int) or batches_consumed < 0:
            raise ValueError(f"batches_consumed must be an int >= 0, got {batches_consumed!r}")
        self.batches_consumed = batches_consumed
        self.worker_states = {}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`DataPosition.state_dict`."""
        for key in ("batches_consumed", "worker_states"):
            if key not in state:
                raise KeyError(f"data position state has no {key!r}")
        self.set_position(int(state["batches_consumed"]))
        self.worker_states = {int(r): s for r, s in state["worker_states"].items()}

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self.batches_consumed) % num_workers
        rank, world_size = self.rank, self.world_size
        if rank is None or world_size is None:
            env_rank, env_world = distributed_rank_world()
            rank = env_rank if rank is None else rank
            world_size = env_world if world_size is None else world_size
        shard = ShardSpec.from_rank_worker(rank, world_size, role, num_workers)
        mixer = TaskMixer(self.build_streams(shard), self.ratios, seed=self.seed, mode=self.mode)
        share = max(0, -(-(self.batches_consumed - role) // num_workers))
        saved = self.worker_states.get(role)
        if saved is not None:
            if saved["num_workers"] != num_workers or saved["batches"] != share:
                raise ValueError(
                    f"saved data state of worker role {role} is after batch {saved['batches']} "
                    f"of {saved['num_workers']} workers, but resuming at {self.batches_consumed} "
                    f"batches with {num_workers} workers needs batch {share}")
            mixer.load_state_dict(saved["mixer"])
        elif self.worker_states and share > 0:
            raise ValueError(f"the saved data position has no state for worker role {role}")
        else:
            mixer.fast_forward(share * self.batch_size)
        samples = iter(mixer)
        produced = share
        while True:
            batch = list(itertools.islice(samples, self.batch_size))
            if self.transform is not None:
                batch = [self.transform(s) for s in batch]
            out = self.collate(batch) if self.collate is not None else batch
            produced += 1
            _attach_state(out, {"role": role, "num_workers": num_workers,
                                "batches": produced, "mixer": mixer.state_dict()})
            yield out


class DataPosition:
    """The trainer's record of where the data stands: feed it every batch it consumes.

    ``state_dict()`` is what a checkpoint stores; ``MixedTaskDataset.load_state_dict`` restores
    it, and the batches after the restart equal those of an uninterrupted run.
    """

    def __init__(self):
        self.batches_consumed = 0
        self.worker_states: dict[int, dict] = {}

    def update(self, batch) -> None:
        state = _state_of(batch)
        if state is None:
            raise ValueError("batch has no data_state (its collate must return a dict or an "
                             "object with a data_state attribute, e.g. LoaderBatch)")
        self.worker_states[int(state["role"])] = copy.deepcopy(state)
        self.batches_consumed += 1

    def state_dict(self) -> dict:
        return {"batches_consumed": self.batches_consumed,
                "worker_states": copy.deepcopy(self.worker_states)}

    def load_state_dict(self, state: dict) -> None:
        self.batches_consumed = int(state["batches_consumed"])
        self.worker_states = {int(r): s for r, s in state["worker_states"].items()}


def _attach_state(out, state: dict) -> None:
    """A collated batch carries its worker's position out: a dict under ``"data_state"``, an
    object (:class:`~unigen.data.batches.LoaderBatch`) in its ``data_state`` attribute."""
    if isinstance(out, dict):
        out["data_state"] = state
    elif hasattr(out, "data_state"):
        out.data_state = state


def _state_of(batch) -> dict | None:
    if isinstance(batch, dict):
        return batch.get("data_state")
    return getattr(batch, "data_state", None)
