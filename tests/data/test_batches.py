"""The data layer builds the model's batch: from the pipeline's task groups
(batch_from_task_groups) and, in the loader, as a LoaderBatch (images decoded in the workers or
left encoded for finish_batch)."""

import pytest
import torch

from unigen.data.batches import LoaderBatch, UniGenCollate, batch_from_task_groups, finish_batch
from unigen.data.collate import collate_task_batch
from unigen.data.image_pipeline import ImageSpec, PilImageDecoder
from unigen.data.synthetic_text import synthetic_corpus
from unigen.data.synthetic_world import encode_jpeg
from unigen.model.image_encoder import preprocess_images
from unigen.model.tokenizers import train_tiny_tokenizers
from unigen.model.unigen_model import UniGen

QUESTION = "what is the color of the thing?"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return train_tiny_tokenizers(synthetic_corpus(), tmp_path_factory.mktemp("tok"),
                                 text_vocab_size=300, decoder_vocab_size=300)


def tiny_model(tokenizers):
    torch.manual_seed(0)
    model = UniGen.tiny(tokenizers)
    model.configure_backends(kernels="torch", attention="torch")
    return model


def make_image(k: int) -> torch.Tensor:
    """A 40x40 uint8 image of noise, its own for each k."""
    return torch.randint(0, 256, (3, 40, 40), generator=torch.Generator().manual_seed(k),
                         dtype=torch.uint8)


def test_batch_from_the_data_pipeline_groups(tokenizers):
    """The data pipeline's collate output (grouped by task) converts to a UniGenBatch that
    trains: match-group pairs feed L_CL and the mined [match]."""
    model = tiny_model(tokenizers)
    enc, dec = model.text_tokenizer, model.decoder_tokenizer
    eos = dec.eos_token_id

    def tgt(s):
        return dec(s, add_special_tokens=False)["input_ids"] + [eos]

    def src(s):
        return enc(s, truncation=True, max_length=16)["input_ids"]

    img = [preprocess_images(make_image(k), image_size=32)[0] for k in range(4)]
    samples = [
        dict(task="trans", encoder_ids=src("ein Hund"), target_ids=tgt("a dog")),
        dict(task="cap", image=img[0], encoder_ids=[], target_ids=tgt("a red cat")),
        dict(task="qus", image=img[1], encoder_ids=src(QUESTION), target_ids=tgt("red")),
        dict(task="match", image=img[2], encoder_ids=src("un chat"), target_ids=tgt("yes"), key="a"),
        dict(task="match", image=img[3], encoder_ids=src("ein Vogel auf dem Gras"),
             target_ids=tgt("yes"), key="b"),
        dict(task="match", image=img[3], encoder_ids=src("a bird on the grass"),
             target_ids=tgt("yes"), key="b"),
    ]
    groups = collate_task_batch(samples, encoder_pad_id=enc.pad_token_id, decoder_pad_id=eos)
    b = batch_from_task_groups(groups, encoder_pad_id=enc.pad_token_id)
    b.validate(image_size=32, max_text_length=16)
    assert b.task_counts() == {"trans": 1, "cap": 1, "qus": 1, "match": 0}
    assert b.num_pairs == 3 and b.pair_ids.tolist() == [0, 1, 1]
    assert b.target_ids.tolist() == tgt("a dog") + tgt("a red cat") + tgt("red")
    out = model(b)
    # 3 positives; the pair "a" has 2 negative candidates, the two "b" pairs only the "a" one.
    assert out.num_samples["match"] == 3 + 3 + 3
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="unknown tasks"):
        batch_from_task_groups({"vqa": groups["qus"]})


def test_loader_batch_decoded_in_the_workers_or_after_equals(tokenizers):
    """The same samples through the in-worker path (PIL decodes in collate) and the DALI-style
    path (images left encoded, finish_batch decodes in the trainer) give the same batch; a
    sample whose image does not decode is dropped and counted either way."""
    text_tok, dec_tok = tokenizers.load()
    eos = dec_tok.eos_token_id

    def ids(s):
        return dec_tok(s, add_special_tokens=False)["input_ids"] + [eos]

    jpeg = encode_jpeg(make_image(1).permute(1, 2, 0).numpy())
    samples = [dict(task="cap", image=jpeg, encoder_ids=[], target_ids=ids("a red cat")),
               dict(task="cap", image=b"not a jpeg", encoder_ids=[], target_ids=ids("a dog")),
               dict(task="trans", encoder_ids=text_tok("ein Hund")["input_ids"],
                    target_ids=ids("a dog"))]
    pil = PilImageDecoder(ImageSpec(32))

    def task_collate(decoder):
        return lambda s: collate_task_batch(s, encoder_pad_id=text_tok.pad_token_id,
                                            decoder_pad_id=eos, image_decoder=decoder)

    in_workers = UniGenCollate(task_collate(pil), encoder_pad_id=text_tok.pad_token_id)(samples)
    assert isinstance(in_workers, LoaderBatch) and in_workers.groups is None
    assert (in_workers.num_samples, in_workers.dropped) == (2, 1)
    later = UniGenCollate(task_collate(None), encoder_pad_id=text_tok.pad_token_id)(samples)
    assert later.batch is None and (later.num_samples, later.dropped) == (3, 0)
    batch = finish_batch(later, image_decoder=pil, encoder_pad_id=text_tok.pad_token_id,
                         decoder_pad_id=eos)
    assert (later.num_samples, later.dropped) == (2, 1) and later.batch is batch
    for name in ("task", "image_index", "text_index", "target_ids", "target_cu_seqlens",
                 "images", "text_ids"):
        assert torch.equal(getattr(batch, name), getattr(in_workers.batch, name)), name
    with pytest.raises(TypeError, match="expected a LoaderBatch"):
        finish_batch({"batch": batch})
    with pytest.raises(ValueError, match="no image decoder"):
        finish_batch(UniGenCollate(task_collate(None), encoder_pad_id=1)(samples))
