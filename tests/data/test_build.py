import pytest
import torch

from unigen.configuration import ConfigError, load_config
from unigen.data import DataConfig, dali_available
from unigen.data.build import build_mixed_dataset, build_task_streams
from unigen.data.sharding import ShardSpec
from unigen.data.task_tokenizer import TaskTokenizer


def world_overrides(world, *extra):
    return [f"--data.wikimatrix={','.join(world.wikimatrix)}",
            f"--data.image_shards={','.join(world.image_shards)}",
            f"--data.cc6l={world.cc6l}", f"--data.ccqa={world.ccqa}", *extra]


def load(world, *extra):
    from dataclasses import dataclass, field

    @dataclass(kw_only=True)
    class Run:
        data: DataConfig = field(default_factory=DataConfig)

    return load_config(Run, overrides=world_overrides(world, *extra)).data


def test_data_config_from_overrides_validates(world):
    cfg = load(world, "--data.ratios.qus=0.5", "--data.image_backend=pil")
    assert cfg.ratios["qus"] == 0.5 and cfg.image_backend == "pil"
    with pytest.raises(ConfigError, match="expected one of 'auto', 'dali', 'pil'"):
        load(world, "--data.image_backend=opencv")
    with pytest.raises(ConfigError, match="unknown task 'caption'"):
        load(world, "--data.ratios.caption=1")
    with pytest.raises(ValueError, match=r"tasks \['qus'\] have a positive ratio but no data"):
        DataConfig(wikimatrix=tuple(world.wikimatrix), image_shards=tuple(world.image_shards))


def test_mixed_dataset_batches_on_the_world(world, tiny_tokenizer_dirs):
    cfg = load(world, "--data.batch_size=12", "--data.image_backend=pil",
               "--data.image_size=32", "--data.max_encoder_len=40", "--data.mixing=interleave",
               "--data.shuffle_buffer=16")
    streams = build_task_streams(cfg, ShardSpec(0, 1))
    assert set(streams) == {"trans", "cap", "qus", "match"}
    tok = TaskTokenizer(*tiny_tokenizer_dirs, max_encoder_len=cfg.max_encoder_len)
    ds = build_mixed_dataset(cfg, tok, rank=0, world_size=1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0)))
    assert set(batch) == {"trans", "cap", "qus", "match", "dropped", "dropped_samples", "data_state"}
    assert batch["dropped"] == 0 and batch["dropped_samples"] == []
    assert sum(len(batch[t]["key"]) for t in ("trans", "cap", "qus", "match")) == 12
    assert batch["cap"]["images"].shape[1:] == (3, 32, 32) and "encoder" not in batch["cap"]
    assert batch["match"]["encoder"]["input_ids"].shape[1] <= 40
    assert set(batch["trans"]["lang"]) <= {"de", "fr", "ja", "es", "sw"}


@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_backend_decodes_in_the_main_process(world, tiny_tokenizer_dirs):
    from unigen.data import DaliImageDecoder, ImageSpec, PilImageDecoder, decode_batch_images

    cfg = load(world, "--data.batch_size=8", "--data.image_backend=dali", "--data.image_size=32",
               "--data.mixing=interleave")
    tok = TaskTokenizer(*tiny_tokenizer_dirs)
    batch = next(iter(build_mixed_dataset(cfg, tok, rank=0, world_size=1)))
    assert isinstance(batch["cap"]["images"], list)  # left encoded by the worker
    pil = {t: PilImageDecoder(ImageSpec(size=32)).decode(batch[t]["images"])[0]
           for t in ("cap", "qus", "match")}
    kw = dict(encoder_pad_id=tok.encoder_pad_id, decoder_pad_id=tok.decoder_pad_id)
    decode_batch_images(batch, DaliImageDecoder(ImageSpec(size=32), device="cpu"), **kw)
    for t in ("cap", "qus", "match"):
        assert batch[t]["images"].shape == pil[t].shape
        # 64 → 32 bilinear: within one uint8 step of PIL (see test_image_pipeline)
        assert (batch[t]["images"] - pil[t]).abs().max().item() < 0.016
