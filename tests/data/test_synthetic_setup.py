"""The synthetic world and its tokenizers, made once in a folder and reused: written under
temporary names, refused when the folder holds other settings; and the world's module runs as
``python -m`` without runpy's double-import warning."""

import os
import subprocess
import sys

import pytest

from unigen.data.synthetic_setup import ensure_synthetic_world

SMALL = dict(num_images=20, num_text_pairs=10, num_eval_images=4, image_size=32,
             text_vocab_size=300, decoder_vocab_size=300)


def test_made_once_then_reused(tmp_path):
    first = ensure_synthetic_world(str(tmp_path), **SMALL)
    assert first.made == ("world", "tokenizers")
    assert sorted(os.listdir(tmp_path)) == ["tokenizers", "world"]  # no temporary left
    assert first.world.counts["images"] == 20 and len(first.world.image_shards) == 1
    again = ensure_synthetic_world(str(tmp_path), **SMALL)
    assert again.made == ()
    assert again.world.image_shards == first.world.image_shards
    assert (again.tokenizers.text_vocab_size, again.tokenizers.decoder_vocab_size) == \
        (first.tokenizers.text_vocab_size, first.tokenizers.decoder_vocab_size)
    # the sizes are the trained tokenizers', which the model must take
    from unigen.model.tokenizers import load_decoder_tokenizer, load_text_tokenizer

    assert len(load_text_tokenizer(again.tokenizers.text_dir)) == again.tokenizers.text_vocab_size
    assert len(load_decoder_tokenizer(again.tokenizers.decoder_dir)) == \
        again.tokenizers.decoder_vocab_size + 4  # the task tokens on top


def test_other_settings_are_refused_by_name(tmp_path):
    ensure_synthetic_world(str(tmp_path), **SMALL)
    with pytest.raises(ValueError, match=r"holds a synthetic world of other settings "
                                         r"\(num_images 20, not 30; seed 0, not 1\)"):
        ensure_synthetic_world(str(tmp_path), **{**SMALL, "num_images": 30}, seed=1)
    with pytest.raises(ValueError, match="tokenizer pair of other settings"):
        ensure_synthetic_world(str(tmp_path), **{**SMALL, "decoder_vocab_size": 320})


def test_a_half_made_folder_is_not_mistaken_for_a_world(tmp_path):
    os.makedirs(tmp_path / "world")
    with pytest.raises(ValueError, match="exists but holds no world.json"):
        ensure_synthetic_world(str(tmp_path), **SMALL)


def test_module_runs_without_runpy_warning(tmp_path):
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m",
                           "unigen.data.synthetic_world", str(tmp_path / "w"), "--num-images", "4",
                           "--num-text-pairs", "2", "--num-eval-images", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and "wrote 4 images" in proc.stdout
