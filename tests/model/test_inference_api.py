"""The inference API of UniGen on the tiny config: caption, translate, answer, match, embed_*,
retrieve; cached vs uncached generation; PIL and tensor images; clear errors."""

import pytest
import torch

from unigen.data.examples import Example, collate_examples
from unigen.data.synthetic_text import sentence_of
from unigen.model.unigen_model import UniGen


@pytest.fixture(scope="module")
def model(tokenizers):
    torch.manual_seed(0)
    m = UniGen.tiny(tokenizers)
    m.configure_backends(kernels="torch", attention="torch")
    return m.eval()


def image(k):
    g = torch.Generator().manual_seed(k)
    img = torch.empty(3, 40, 40, dtype=torch.uint8)
    img[:] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    y, x = (int(v) for v in torch.randint(0, 24, (2,), generator=g))
    img[:, y:y + 16, x:x + 16] = 255 - img[:, y:y + 16, x:x + 16]
    return img


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_cache_equals_without(model, num_beams):
    imgs = [image(i) for i in range(3)]
    texts = ["un chat rouge sur l'herbe", "ein Hund", "a blue car in the street under the table"]
    for task, kw in (("cap", dict(images=imgs)), ("trans", dict(texts=texts)),
                     ("qus", dict(images=imgs, texts=texts)), ("match", dict(images=imgs, texts=texts))):
        cached = model.generate_ids(task, max_new_tokens=6, num_beams=num_beams, **kw)
        plain = model.generate_ids(task, max_new_tokens=6, num_beams=num_beams, use_cache=False, **kw)
        assert cached == plain, task
        assert len(cached) == 3 and all(len(t) <= 6 for t in cached)


def test_generation_continues_the_prefix_greedily(model):
    """The first generated token is the argmax of the decoder's next-token distribution after
    E_t ⊕ [trans] (a check of the prefix the API builds, independent of generate())."""
    text = "le chat noir"
    ids = model.generate_ids("trans", texts=[text], max_new_tokens=1)[0]
    enc = model.text_tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        _, e_t = model.encode_texts(enc["input_ids"], enc["attention_mask"].bool())
        prefix = torch.cat([e_t[0], model.decoder.wte.weight[model.task_token_ids[0]][None]])
        h = model.decoder.forward_padded(prefix[None], torch.tensor([prefix.shape[0]]),
                                         torch.tensor([prefix.shape[0]]))
        logits = h[0, -1] @ model.decoder.lm_head_weight.t()
    expected = int(logits.argmax())
    assert ids == ([] if expected == model.config.tasks.eos_token_id else [expected])


def test_string_outputs_and_batching(model):
    caps = model.caption([image(0), image(1)], max_new_tokens=5)
    assert isinstance(caps, list) and len(caps) == 2 and all(isinstance(c, str) for c in caps)
    # Batched generation equals one-by-one generation (left-padded prefixes of unequal length).
    texts = ["ein rotes Auto", "a cat on the grass near the tree", "un oiseau"]
    together = model.translate(texts, max_new_tokens=5)
    alone = [model.translate([t], max_new_tokens=5)[0] for t in texts]
    assert together == alone
    answers = model.answer([image(2)], ["what is the color of the thing?"], max_new_tokens=3)
    assert len(answers) == 1


def test_pil_and_tensor_images_agree(model):
    from PIL import Image

    img = image(5)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    a = model.embed_images([pil])
    b = model.embed_images(img)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # Preprocessed float tensors of the right size are used as they are.
    from unigen.model.image_encoder import preprocess_images

    x = preprocess_images([img], image_size=model.config.vision.image_size)
    torch.testing.assert_close(model.embed_images(x), b)


def test_match_probability(model):
    imgs = [image(0), image(1)]
    texts = ["a red cat", "ein Hund"]
    p = model.match(imgs, texts)
    assert p.shape == (2,) and bool(((p > 0) & (p < 1)).all())
    # Batched equals single, and it is P(yes)/(P(yes)+P(no)) of the two answer sequences.
    torch.testing.assert_close(p[1:], model.match([imgs[1]], [texts[1]]), rtol=1e-5, atol=1e-6)


def test_score_answers_ranks_a_closed_set(model):
    imgs = [image(i) for i in range(3)]
    texts = [sentence_of("en", (i, i, i)) for i in range(3)]
    lp = model.score_answers(imgs, texts, ["yes", "no", "a red cat"], task="match")
    assert lp.shape == (3, 3) and bool((lp < 0).all())
    # [match]'s probability is the renormalised pair of its two answers' sequence probabilities
    torch.testing.assert_close(torch.sigmoid(lp[:, 0] - lp[:, 1]), model.match(imgs, texts),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="candidates must be a non-empty list"):
        model.score_answers(imgs, texts, [])
    with pytest.raises(ValueError, match="task must be 'qus' or 'match'"):
        model.score_answers(imgs, texts, ["yes"], task="cap")


def test_embeddings_and_retrieval(model):
    imgs = [image(i) for i in range(4)]
    texts = [sentence_of("en", (i, i, i % 4)) for i in range(5)]
    ie, te = model.embed_images(imgs), model.embed_texts(texts)
    assert ie.shape == (4, 16) and te.shape == (5, 16)
    torch.testing.assert_close(ie.norm(dim=-1), torch.ones(4))
    r = model.retrieve(imgs, texts, k=3)
    assert r.image_to_text.shape == (4, 3) and r.text_to_image.shape == (5, 3)
    sim = ie @ te.t()
    for i in range(4):
        # The candidates are the contrastive top-3 ...
        assert set(r.image_to_text[i].tolist()) == set(sim[i].topk(3).indices.tolist())
        # ... re-ranked by the [match] probability, best first.
        assert bool((r.image_to_text_scores[i][:-1] >= r.image_to_text_scores[i][1:]).all())
        expected = model.match([imgs[i]] * 3, [texts[j] for j in r.image_to_text[i].tolist()])
        torch.testing.assert_close(r.image_to_text_scores[i], expected, rtol=1e-4, atol=1e-5)
    for j in range(5):
        assert set(r.text_to_image[j].tolist()) == set(sim[:, j].topk(3).indices.tolist())
    # Encoding and [match] scoring in chunks changes nothing.
    small = model.retrieve(imgs, texts, k=3, batch_size=2)
    for a, b in zip(small.__dict__.values(), r.__dict__.values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # k larger than the gallery is capped.
    assert model.retrieve(imgs[:2], texts, k=10).image_to_text.shape == (2, 5)


def test_trained_model_translates_what_it_learned(tokenizers):
    """Overfit [trans] on two sentences; greedy decoding (cached and beam) then returns them."""
    torch.manual_seed(0)
    m = UniGen.tiny(tokenizers)
    m.configure_backends(kernels="torch", attention="torch")
    pairs = [("un chat rouge sur l'herbe", "a red cat on the grass"),
             ("ein blauer Hund", "a blue dog")]
    batch = collate_examples([Example(task="trans", text=s, target=t) for s, t in pairs],
                             text_tokenizer=m.text_tokenizer, decoder_tokenizer=m.decoder_tokenizer,
                             image_size=m.config.vision.image_size,
                             max_text_length=m.config.text.max_length)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(100):
        loss = m(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.05
    m.eval()
    src = [s for s, _ in pairs]
    assert m.translate(src, max_new_tokens=24) == [t for _, t in pairs]
    assert m.translate(src, max_new_tokens=24, num_beams=2) == [t for _, t in pairs]


def test_bad_inputs(model, tokenizers):
    with pytest.raises(ValueError, match="texts must be a non-empty list"):
        model.translate([])
    with pytest.raises(ValueError, match=r"texts\[1\] must be a non-empty string"):
        model.translate(["ok", ""])
    with pytest.raises(ValueError, match="images is empty"):
        model.caption([])
    with pytest.raises(ValueError, match="32x32"):
        model.caption(torch.zeros(1, 3, 48, 48))  # float = preprocessed, must be 32x32
    with pytest.raises(TypeError, match="PIL image or a tensor"):
        model.caption(["not an image"])
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        model.match([image(0), image(1)], ["a cat"])
    with pytest.raises(ValueError, match="unknown task 'describe'"):
        model.generate_ids("describe", images=[image(0)])
    with pytest.raises(ValueError, match="k must be a positive int"):
        model.retrieve([image(0)], ["a cat"], k=0)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        model.retrieve([image(0)], ["a cat"], batch_size=0)
    bare = UniGen.tiny()
    with pytest.raises(RuntimeError, match="no tokenizers attached"):
        bare.translate(["a cat"])
    with pytest.raises(ValueError, match="task token"):
        # A decoder tokenizer whose base vocabulary differs from the model's.
        bare.set_tokenizers(*tokenizers.load())
