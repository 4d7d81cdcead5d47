"""MaRVL/NLVR2 as two image prefixes, E_v(left) ⊕ E_v(right) (pair_images=two_prefixes): the
packed training input and the inference prefix are the same sequence, and the option runs
through fine-tuning and scoring."""

import pytest
import torch
import yaml

from unigen.data.examples import Example, collate_examples
from unigen.data.synthetic_text import synthetic_corpus
from unigen.iglue.evaluate import evaluate
from unigen.iglue.finetune import finetune, parse_args
from unigen.model.tokenizers import train_tiny_tokenizers
from unigen.model.unigen_model import UniGen

from .conftest import save_image, write_lines


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    tok = train_tiny_tokenizers(synthetic_corpus(), root / "tok", text_vocab_size=300,
                                decoder_vocab_size=300)
    model = UniGen.tiny(tok)
    model.save_pretrained(root / "pre")
    return root, model.eval()


def test_two_prefix_training_loss_is_the_inference_log_probability(tiny):
    _, model = tiny
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(0)
    left, right = (torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
                   for _ in range(2))

    def collate(examples):
        return collate_examples(examples, text_tokenizer=model.text_tokenizer,
                                decoder_tokenizer=model.decoder_tokenizer, image_size=size,
                                image_mean=model.config.vision.image_mean,
                                image_std=model.config.vision.image_std)

    ex = Example("qus", target="yes", image=left, image_id="l", text="the left one is red",
                 second_image=right, second_image_id="r")
    batch = collate([ex])
    assert batch.second_image_index.tolist() == [1] and batch.num_images == 2
    n_target = int(batch.target_lengths()[0])
    with torch.no_grad():
        loss = model(batch).losses["qus"]
        logprob = model.score_answers(left[None], ["the left one is red"], ["yes"],
                                      second_images=right[None])[0, 0]
        one_image = model.score_answers(left[None], ["the left one is red"], ["yes"])[0, 0]
    # the training loss is the mean negative log-probability of the same target tokens
    torch.testing.assert_close(loss * n_target, -logprob, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logprob, one_image)  # the second prefix is read
    answers = model.answer(left[None], ["the left one is red"], second_images=right[None],
                           max_new_tokens=3)
    assert len(answers) == 1
    with pytest.raises(ValueError, match="1 images but 2 second images"):
        model.answer(left[None], ["q"], second_images=torch.stack([right, right]))
    with pytest.raises(ValueError, match=r"\(cap\) cannot read a second image"):
        collate([Example("cap", target="x", image=left, second_image=right)])


def test_two_prefixes_fine_tune_and_score(tiny, tmp_path):
    root, _ = tiny
    images = tmp_path / "nlvr2"
    for i in range(4):
        for side, colour in ((0, "red"), (1, "blue" if i % 2 else "red")):
            save_image(images, f"train/{i}/train-{i}-0-img{side}.png", colour)
    train = write_lines(tmp_path / "train.jsonl", [
        {"sentence": "both images are red", "identifier": f"train-{i}-0-0",
         "label": "False" if i % 2 else "True"} for i in range(4)])
    args = ["--task", "marvl", "--model", str(root / "pre"), "--train", train, "--images",
            str(images), "--out", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--pair-images", "two_prefixes"]
    cfg = parse_args(args)
    assert cfg.pair_images == "two_prefixes"
    finetune(cfg, log=lambda _: None)
    scores = evaluate("marvl", str(tmp_path / "run" / "model"), [f"en={train}"], str(images),
                      workers=0, device="cpu", pair_images="two_prefixes", log=lambda _: None)
    assert 0.0 <= scores["en"]["accuracy"] <= 1.0
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["pair_images"] == "two_prefixes"
    with pytest.raises(ValueError, match="pair_images=two_prefixes is for marvl"):
        parse_args(["--task", "xvnli", "--model", "m", "--train", train, "--images", str(images),
                    "--pair-images", "two_prefixes"])
