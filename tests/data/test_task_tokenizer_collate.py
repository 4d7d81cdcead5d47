import pytest
import torch

from unigen.data import (
    ImageStore,
    PilImageDecoder,
    QAStream,
    WikiMatrixStream,
    collate_task_batch,
    decode_batch_images,
    pack_token_ids,
    take,
)
from unigen.data.image_pipeline import ImageSpec
from unigen.data.task_tokenizer import TaskTokenizer


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dirs):
    return TaskTokenizer(*tiny_tokenizer_dirs)


def test_encoder_ids_are_framed_and_capped_at_40(tok):
    ids = tok.encode_encoder("links ist ein roter kreis")
    assert ids[0] == tok.encoder.bos_token_id and ids[-1] == tok.encoder.eos_token_id
    long = tok.encode_encoder(" ".join(["a red circle on the left and"] * 20))
    assert len(long) == 40 and long[-1] == tok.encoder.eos_token_id


def test_targets_end_with_end_of_text_and_round_trip(tok):
    ids = tok.encode_target("a red circle on the left")
    assert ids[-1] == tok.eos_id and tok.eos_id not in ids[:-1]
    assert tok.decoder.decode(ids[:-1]) == "a red circle on the left"
    assert len(tok.encode_target("a red circle " * 50)) == tok.max_target_len


def test_each_task_uses_its_fields(tok):
    trans = tok({"task": "trans", "source_text": "un cercle rouge", "target_text": "a red circle"})
    assert trans["encoder_ids"] == tok.encode_encoder("un cercle rouge")
    assert trans["target_ids"] == tok.encode_target("a red circle")
    cap = tok({"task": "cap", "caption": "a blue square"})
    assert cap["encoder_ids"] == [] and cap["target_ids"] == tok.encode_target("a blue square")
    qus = tok({"task": "qus", "question": "what color is the square?", "answer": "blue"})
    assert qus["target_ids"] == tok.encode_target("blue")
    match = tok({"task": "match", "caption": "ein blauer kreis"})
    assert match["target_ids"] == tok.match_target_ids(True) != tok.match_target_ids(False)
    with pytest.raises(ValueError, match="task 'vqa'"):
        tok({"task": "vqa"})


def test_tokenizer_dirs_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder_dir"):
        TaskTokenizer(str(tmp_path / "nope"), str(tmp_path / "nope"))


def test_pack_token_ids_layouts():
    p = pack_token_ids([[5, 6, 7], [8], [9, 10]], pad_id=0)
    assert p["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 10, 0]]
    assert p["attention_mask"].sum(1).tolist() == [3, 1, 2]
    assert p["packed_ids"].tolist() == [5, 6, 7, 8, 9, 10]
    assert p["cu_seqlens"].tolist() == [0, 3, 4, 6] and p["cu_seqlens"].dtype == torch.int32
    assert p["max_seqlen"] == 3


def test_collate_groups_tasks_and_decodes_images(world, tok):
    store = ImageStore(world.image_shards)
    samples = take(WikiMatrixStream(world.wikimatrix), 3) + take(QAStream(world.ccqa,
                                                                         images=store), 2)
    samples = [tok(s) for s in samples]
    samples[3] = dict(samples[3], image=b"corrupt")
    kw = dict(encoder_pad_id=tok.encoder_pad_id, decoder_pad_id=tok.decoder_pad_id)
    batch = collate_task_batch(samples, image_decoder=PilImageDecoder(ImageSpec(size=64)), **kw)
    assert set(batch) == {"trans", "qus", "dropped", "dropped_samples"} and batch["dropped"] == 1
    # where the dropped sample's image is: its shard and key, from the image store
    assert batch["dropped_samples"] == [store.origin(samples[3]["key"])]
    assert batch["dropped_samples"][0].endswith(f".tar[{samples[3]['key']}]")
    assert batch["trans"]["encoder"]["input_ids"].shape[0] == 3
    assert batch["qus"]["images"].shape == (1, 3, 64, 64)
    assert batch["qus"]["target"]["packed_ids"].tolist() == samples[4]["target_ids"]
    # left encoded in a worker, decoded later in the main process: same result
    lazy = collate_task_batch(samples, image_decoder=None, **kw)
    assert isinstance(lazy["qus"]["images"], list)
    decode_batch_images(lazy, PilImageDecoder(ImageSpec(size=64)), **kw)
    assert lazy["dropped"] == 1 and torch.equal(lazy["qus"]["images"], batch["qus"]["images"])
    assert lazy["dropped_samples"] == batch["dropped_samples"]
    assert lazy["qus"]["key"] == batch["qus"]["key"]
    assert torch.equal(lazy["qus"]["encoder"]["input_ids"], batch["qus"]["encoder"]["input_ids"])
    with pytest.raises(KeyError, match="tokenise samples"):
        collate_task_batch([{"task": "cap"}], **kw)


def test_works_with_the_project_tokenizer_loaders(world, tmp_path):
    tokenization = pytest.importorskip("unigen.model.tokenizers")
    from unigen.data.synthetic_world import all_texts

    tiny = tokenization.train_tiny_tokenizers(all_texts(world), tmp_path)
    tok = TaskTokenizer(encoder=tokenization.load_text_tokenizer(tiny.text_dir),
                        decoder=tokenization.load_decoder_tokenizer(tiny.decoder_dir))
    s = tok({"task": "trans", "source_text": "un cercle rouge à gauche",
             "target_text": "a red circle on the left"})
    assert 3 <= len(s["encoder_ids"]) <= 40 and s["target_ids"][-1] == tok.eos_id
    assert tok.decoder.decode(s["target_ids"][:-1]) == "a red circle on the left"
    # task tokens sit after the base vocabulary and never appear in a target
    assert max(s["target_ids"][:-1]) < tiny.decoder_vocab_size
