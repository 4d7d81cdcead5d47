import collections

import pytest
import torch

from unigen.data import (
    ImageStore,
    MixedTaskDataset,
    MultilingualCaptionStream,
    QAStream,
    TaskMixer,
    WebdatasetImageTextStream,
    WikiMatrixStream,
    take,
)


class Counter:
    """An endless resumable stream of numbered samples."""

    def __init__(self, task):
        self.task, self.n = task, 0

    def __iter__(self):
        while True:
            self.n += 1
            yield {"task": self.task, "i": self.n - 1}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def counters(tasks=("trans", "cap", "qus", "match")):
    return {t: Counter(t) for t in tasks}


def test_random_mixing_follows_the_ratios():
    ratios = {"trans": 4, "cap": 2, "qus": 1, "match": 1}
    samples = take(TaskMixer(counters(), ratios, seed=0), 8000)
    freq = collections.Counter(s["task"] for s in samples)
    for task, r in ratios.items():
        assert abs(freq[task] / 8000 - r / 8) < 0.02
    # each stream's samples come out in order: the mixer never drops or repeats one
    for task in ratios:
        assert [s["i"] for s in samples if s["task"] == task] == list(range(freq[task]))


def test_interleave_is_exact_in_every_window():
    ratios = {"trans": 2, "cap": 1, "qus": 1}
    tasks = [s["task"] for s in take(TaskMixer(counters(), ratios, mode="interleave"), 400)]
    for start in range(0, 400, 4):
        assert collections.Counter(tasks[start: start + 4]) == {"trans": 2, "cap": 1, "qus": 1}


def test_mixing_is_deterministic_given_the_seed():
    r = {"trans": 1, "cap": 1, "qus": 1, "match": 1}
    a = [s["task"] for s in take(TaskMixer(counters(), r, seed=11), 300)]
    b = [s["task"] for s in take(TaskMixer(counters(), r, seed=11), 300)]
    c = [s["task"] for s in take(TaskMixer(counters(), r, seed=12), 300)]
    assert a == b and a != c


def test_zero_ratio_switches_a_task_off_and_bad_ratios_fail():
    tasks = {s["task"] for s in take(TaskMixer(counters(), {"trans": 1, "cap": 0}), 200)}
    assert tasks == {"trans"}
    with pytest.raises(ValueError, match="unknown task 'caption'"):
        TaskMixer(counters(), {"caption": 1})
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        TaskMixer(counters(), {"trans": -1})
    with pytest.raises(ValueError, match="at least one task ratio must be positive"):
        TaskMixer(counters(), {"trans": 0})
    with pytest.raises(ValueError, match="unknown task 'qus'"):
        TaskMixer({"trans": Counter("trans"), "cap": Counter("cap")}, {"trans": 1, "qus": 1})


def test_exhausted_stream_is_an_error(world):
    finite = {"trans": WikiMatrixStream(world.wikimatrix), "cap": Counter("cap")}
    with pytest.raises(RuntimeError, match="'trans' stream ran out"):
        take(TaskMixer(finite, {"trans": 1, "cap": 1}), 10_000)


def real_streams(world):
    store = ImageStore(world.image_shards)
    kw = dict(epochs=None, shuffle=True, shuffle_buffer=8, seed=3)
    return {"trans": WikiMatrixStream(world.wikimatrix, min_score=1.04, **kw),
            "cap": WebdatasetImageTextStream(world.image_shards, **kw),
            "qus": QAStream(world.ccqa, images=store, **kw),
            "match": MultilingualCaptionStream(world.cc6l, images=store, **kw)}


def key_of(s):
    return (s["task"], s["origin"])


@pytest.mark.parametrize("mode", ["random", "interleave"])
def test_mixer_resume_from_state_dict_equals_uninterrupted_run(world, mode):
    ratios = {"trans": 2, "cap": 1, "qus": 1, "match": 1}
    full = [key_of(s) for s in take(TaskMixer(real_streams(world), ratios, seed=9, mode=mode),
                                    400)]
    m = TaskMixer(real_streams(world), ratios, seed=9, mode=mode)
    head = [key_of(s) for s in take(m, 230)]  # past an epoch of some streams
    state = m.state_dict()
    resumed = TaskMixer(real_streams(world), ratios, seed=9, mode=mode)
    resumed.load_state_dict(state)
    assert head + [key_of(s) for s in take(resumed, 170)] == full
    ff = TaskMixer(real_streams(world), ratios, seed=9, mode=mode)
    ff.fast_forward(230)
    assert [key_of(s) for s in take(ff, 170)] == full[230:]


def test_mixed_dataset_resumes_with_dataloader_workers(world):
    ratios = {"trans": 1, "cap": 1, "qus": 1, "match": 1}

    def build(shard):
        return _sharded(world, shard)

    def batches(position, n, workers):
        ds = MixedTaskDataset(build, ratios, batch_size=4, seed=2, rank=0, world_size=1,
                              collate=lambda b: [key_of(s) for s in b])
        ds.set_position(position)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
        return out

    full = batches(0, 9, 2)
    assert batches(5, 4, 2) == full[5:]
    flat = [tuple(k) for b in full for k in b]
    assert len(flat) == len(set(flat))  # the two workers read disjoint shards


def _sharded(world, shard):
    store = ImageStore(world.image_shards)
    kw = dict(epochs=None, shuffle=True, shuffle_buffer=8, seed=3, shard=shard)
    return {"trans": WikiMatrixStream(world.wikimatrix, min_score=1.04, **kw),
            "cap": WebdatasetImageTextStream(world.image_shards, **kw),
            "qus": QAStream(world.ccqa, images=store, **kw),
            "match": MultilingualCaptionStream(world.cc6l, images=store, **kw)}


def test_data_position_resumes_exactly_without_replaying(world, monkeypatch):
    from unigen.data import DataPosition

    ratios = {"trans": 1, "cap": 1, "qus": 1, "match": 1}

    def make():
        return MixedTaskDataset(lambda shard: _sharded(world, shard), ratios, batch_size=4,
                                seed=2, rank=0, world_size=1,
                                collate=lambda b: {"keys": [key_of(s) for s in b]})

    def run(ds, n):
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        return [b for b, _ in zip(loader, range(n))]

    full = [b["keys"] for b in run(make(), 9)]
    position = DataPosition()
    for batch in run(make(), 5):
        position.update(batch)
    saved = position.state_dict()
    assert saved["batches_consumed"] == 5 and sorted(saved["worker_states"]) == [0, 1]

    def no_replay(self, n):
        assert n == 0, "resuming from a saved data state must not replay samples"

    monkeypatch.setattr(TaskMixer, "fast_forward", no_replay)
    resumed = make()
    resumed.load_state_dict(saved)
    assert [b["keys"] for b in run(resumed, 4)] == full[5:]
    # a state that does not fit the resumed layout is refused, not silently misapplied
    wrong = make()
    wrong.load_state_dict(dict(saved, batches_consumed=7))
    with pytest.raises(ValueError, match="saved data state of worker role"):
        next(iter(wrong))


def test_interleave_max_gap_is_the_window_that_always_holds_the_task():
    from unigen.data.mixing import TaskMixer, interleave_max_gap

    ratios = {"trans": 2.0, "cap": 1.0, "qus": 0.5, "match": 1.0}
    for task in ratios:
        gap = interleave_max_gap(ratios, task)
        draws = TaskMixer({t: () for t in ratios}, ratios, mode="interleave").draw_tasks(400)
        windows = [draws[i:i + gap] for i in range(len(draws) - gap)]
        assert all(task in w for w in windows), task  # every window of that size holds it
        assert not all(task in draws[i:i + gap - 1] for i in range(len(draws) - gap)), task
    assert interleave_max_gap({"trans": 1, "cap": 1, "qus": 1, "match": 1}, "match") == 4
    assert interleave_max_gap({"match": 1.0}, "match") == 1
    with pytest.raises(ValueError, match="no positive ratio"):
        interleave_max_gap({"trans": 1.0, "match": 0.0}, "match")
