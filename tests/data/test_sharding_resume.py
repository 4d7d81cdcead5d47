import itertools

import pytest
import torch

from unigen.data import ShardSpec, WebdatasetImageTextStream, WikiMatrixStream, take
from unigen.data.stream import RecordStream


def ids_of(samples):
    return [s["origin"] for s in samples]


@pytest.mark.parametrize("shard_by", ["file", "sample"])
@pytest.mark.parametrize("world_size, workers", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_text_shards_partition_the_data(world, shard_by, world_size, workers):
    everything = ids_of(WikiMatrixStream(world.wikimatrix))
    parts = []
    for rank in range(world_size):
        for w in range(workers):
            shard = ShardSpec.from_rank_worker(rank, world_size, w, workers)
            if shard_by == "file" and len(world.wikimatrix) < shard.count:
                continue
            parts.append(ids_of(WikiMatrixStream(world.wikimatrix, shard=shard,
                                                 shard_by=shard_by)))
    if not parts:
        pytest.skip("more shards than files")
    union = list(itertools.chain(*parts))
    assert len(union) == len(set(union))  # no overlap
    assert sorted(union) == sorted(everything)  # no loss
    if shard_by == "sample":  # exact balance
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_image_shards_partition_by_sample_and_file_too_few_files_errors(world):
    n = 4  # more shards than the world's 3 tar files: sample mode
    parts = [ids_of(WebdatasetImageTextStream(world.image_shards, shard=ShardSpec(i, n)))
             for i in range(n)]
    union = list(itertools.chain(*parts))
    assert len(union) == len(set(union)) == world.counts["images"]
    with pytest.raises(ValueError, match="at least as many files as shards"):
        list(WebdatasetImageTextStream(world.image_shards, shard=ShardSpec(0, 4),
                                       shard_by="file"))


def test_shard_resolves_rank_world_and_dataloader_workers(world, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    stream = WikiMatrixStream(world.wikimatrix, shard_by="sample")
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
    got = sorted(s["origin"] for s in loader)
    expect = sorted(itertools.chain(*(
        ids_of(WikiMatrixStream(world.wikimatrix, shard=ShardSpec(i, 4), shard_by="sample"))
        for i in (2, 3))))
    assert got == expect and len(got) > 0


@pytest.mark.parametrize("make", [
    lambda w: WikiMatrixStream(w.wikimatrix, shuffle=True, shuffle_buffer=16, seed=5,
                               epochs=3, min_score=1.04),
    lambda w: WebdatasetImageTextStream(w.image_shards, shuffle=True, shuffle_buffer=8, seed=5,
                                        epochs=2),
])
@pytest.mark.parametrize("stop", [1, 37, 130])
def test_resume_from_state_dict_continues_exactly(world, make, stop):
    full = ids_of(take(make(world), 200))
    first = make(world)
    head = take(first, stop)
    state = first.state_dict()
    resumed = make(world)
    resumed.load_state_dict(state)
    assert ids_of(head) + ids_of(take(resumed, 200 - stop)) == full


def test_shuffle_is_seeded_and_changes_per_epoch(world):
    a = ids_of(WikiMatrixStream(world.wikimatrix, shuffle=True, shuffle_buffer=32, seed=1))
    b = ids_of(WikiMatrixStream(world.wikimatrix, shuffle=True, shuffle_buffer=32, seed=1))
    c = ids_of(WikiMatrixStream(world.wikimatrix, shuffle=True, shuffle_buffer=32, seed=2))
    plain = ids_of(WikiMatrixStream(world.wikimatrix))
    assert a == b and a != c and a != plain and sorted(a) == sorted(plain)
    two = ids_of(WikiMatrixStream(world.wikimatrix, shuffle=True, shuffle_buffer=32, seed=1,
                                  epochs=2))
    assert two[: len(a)] == a and two[len(a):] != a and sorted(two[len(a):]) == sorted(a)


def test_endless_stream_on_an_empty_shard_errors(tmp_path):
    p = tmp_path / "WikiMatrix.de-en.tsv"
    p.write_text("1.1\tein\tone\n")
    with pytest.raises(ValueError, match="has no samples"):
        take(WikiMatrixStream(str(p), epochs=None, shard=ShardSpec(1, 2), shard_by="sample"), 1)
    with pytest.raises(ValueError, match="consumed"):
        WikiMatrixStream(str(p)).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="index"):
        ShardSpec(2, 2)


def test_base_stream_rejects_bad_arguments(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("x\n")
    with pytest.raises(ValueError, match="shard_by"):
        RecordStream(str(p), shard_by="rows")
    with pytest.raises(ValueError, match="epochs"):
        RecordStream(str(p), epochs=0)
