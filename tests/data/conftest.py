"""Shared fixtures for the data tests: a small synthetic world and tiny tokenizers."""

import os
import sys

import pytest

from unigen.data.synthetic_world import all_texts, write_synthetic_world

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # for data_test_helpers


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return write_synthetic_world(str(root), num_images=120, num_text_pairs=60,
                                 num_eval_images=24, shard_size=40, seed=7)


@pytest.fixture(scope="session")
def tiny_tokenizer_dirs(world, tmp_path_factory):
    """An XLM-R-like unigram tokenizer and a GPT-2-like byte-level BPE, trained on the world."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = all_texts(world)
    root = tmp_path_factory.mktemp("tokenizers")
    enc = Tokenizer(models.Unigram())
    enc.normalizer = normalizers.NFKC()
    enc.pre_tokenizer = pre_tokenizers.Metaspace()
    enc.decoder = decoders.Metaspace()
    enc.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>"))
    enc.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", enc.token_to_id("<s>")), ("</s>", enc.token_to_id("</s>"))])
    PreTrainedTokenizerFast(tokenizer_object=enc, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                            cls_token="<s>", sep_token="</s>").save_pretrained(str(root / "enc"))
    dec = Tokenizer(models.BPE())
    dec.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    dec.decoder = decoders.ByteLevel()
    dec.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=dec, bos_token="<|endoftext|>",
                            eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(str(root / "dec"))
    return str(root / "enc"), str(root / "dec")
