"""The rule extractor's patterns and the loop's handling of backend answers."""

from collections import Counter

import pytest

from unigen.questioner import Backend, BackendError, CaptionReader, Failure, OutputStore, Shard, run
from unigen.questioner.backends.rule import extract_pairs


@pytest.mark.parametrize(
    "caption, pairs",
    [
        ("a worker sits on a bench in front of a group of young people.",
         [("A worker sits on what?", "bench")]),
        ("two dogs running through the snow.",
         [("Two dogs running through what?", "snow"), ("How many dogs are there?", "two")]),
        ("a red car parked next to the old house, at night",
         [("A red car parked next to what?", "old house"), ("What color is the car?", "red")]),
        ("portrait of a smiling man", []),
        ("black and white photo", []),
    ],
)
def test_rule_extractor(caption, pairs):
    assert extract_pairs(caption) == pairs


class Scripted(Backend):
    """Answers from a script; a ``Failure`` or a wrong-length answer where the test wants one."""

    name = "scripted"
    default_batch_size = 2

    def __init__(self, answers):
        self.answers = list(answers)
        self.batches = []

    def generate(self, prompts, captions):
        self.batches.append(list(captions))
        return self.answers.pop(0)


def _setup(tmp_path, lines):
    src = tmp_path / "c.txt"
    src.write_text("\n".join(lines) + "\n")
    return CaptionReader([src]), OutputStore(tmp_path / "o.jsonl", run_header={"shard": "0/1"})


def test_retryable_failures_are_not_recorded_permanent_ones_are(tmp_path):
    reader, store = _setup(tmp_path, ["a man on a bench", "a dog on a sofa", "a cat in a box"])
    backend = Scripted([
        [Failure("endpoint_error", retryable=True), Failure("prompt_too_long", retryable=False)],
        [" What is the cat in? <answer> box"],
    ])
    with store:
        stats = run(reader, backend, store, progress=False)
    assert stats.backend_errors == {"endpoint_error": 1}
    assert store.done == {"000000001", "000000002"}
    assert store.totals.rejected == Counter({"prompt_too_long": 1}) and store.totals.kept == 1


def test_batch_where_every_request_failed_stops_the_run(tmp_path):
    reader, store = _setup(tmp_path, ["a man on a bench", "a dog on a sofa"])
    backend = Scripted([[Failure("endpoint_error", retryable=True, detail="HTTP 503")] * 2])
    with store, pytest.raises(BackendError, match="all 2 requests of a batch failed.*HTTP 503"):
        run(reader, backend, store, progress=False)


def test_wrong_number_of_generations_is_an_error(tmp_path):
    reader, store = _setup(tmp_path, ["a man on a bench", "a dog on a sofa"])
    with store, pytest.raises(BackendError, match="returned 1 generations for 2 prompts"):
        run(reader, Scripted([["x"]]), store, progress=False)


def test_shard_parsing_and_membership():
    assert str(Shard.parse("2/8")) == "2/8"
    keys = [f"{i:09d}" for i in range(1000)]
    owners = [[k in Shard(i, 4) for i in range(4)] for k in keys]
    assert all(sum(o) == 1 for o in owners)  # every key in exactly one shard
    sizes = [sum(o[i] for o in owners) for i in range(4)]
    assert min(sizes) > 200  # and the split is roughly even
