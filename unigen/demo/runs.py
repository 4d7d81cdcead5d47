"""The demos' runs: one pre-training config per (seed, setting), and a scheduler that trains and
scores them with ``python -m unigen.train`` and ``python -m unigen.scoring.world``, as many at a
time as there are cores, one thread each, with one progress bar over all of them.

Every setting of one seed shares the world, the tokenizers and the pre-trained tiny CLIP; the
settings differ only in the config keys their switches change (the ablated data or loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class Run:
    """One training run and where its results go."""

    setting: str
    """Which setting (e.g. "unigen", "no_translation", "no_ccqa")."""
    seed: int
    config: object
    """Its :class:`~unigen.pretraining.PretrainConfig`."""
    world_dir: str
    """The synthetic world it is scored on."""

    @property
    def run_dir(self) -> str:
        return self.config.run.output_dir

    @property
    def scores_path(self) -> str:
        return os.path.join(self.run_dir, "scores.json")


IMAGE_TASK_RATIOS = {"cap": 1.0, "qus": 1.0, "match": 1.0}


def batch_with_translation(args) -> int:
    """The full model's batch: ``args.batch_size`` image-task samples plus translation pairs in
    ``trans_ratio`` to each image task's share (48 + 16 by default). An ablation without
    translation pairs keeps the ``args.batch_size`` image-task samples, so the two see the same
    image data per step and differ in the translation pairs only."""
    return args.batch_size + round(args.batch_size * args.trans_ratio
                                   / sum(IMAGE_TASK_RATIOS.values()))


def demo_vision(*, frozen: bool = True):
    """The demos' ViT: the tiny model's, with 4-pixel patches (with 8-pixel ones every object
    straddles four patches that neighbouring positions share)."""
    from unigen.model.config import UniGenConfig

    return dataclasses.replace(UniGenConfig.tiny().vision, frozen=frozen, patch_size=4)


def base_config(world, tok, run_dir: str, args, *, clip_dir: str, seed: int):
    """The demos' pre-training config (every task); settings switch parts of it off."""
    from unigen.data.config import DataConfig
    from unigen.model.config import UniGenConfig
    from unigen.pretraining import PretrainConfig
    from unigen.pretraining.config import InitConfig
    from unigen.training.config import (
        CheckpointConfig,
        LoggingConfig,
        OptimConfig,
        RunConfig,
        ScheduleConfig,
    )

    # The ViT comes from the tiny CLIP (unigen.demo.tiny_clip) and stays frozen, as the paper's
    # CLIP ViT-L/14 does.
    model = UniGenConfig.tiny(vision=demo_vision(frozen=True))
    # L_CL below the paper's weight 1: in the runs that chose the demo's settings weight 1
    # learned the image languages as well but transferred less to es/sw (docs/demo.md).
    model.loss.contrastive_weight = args.contrastive_weight
    model.text.vocab_size, model.decoder.vocab_size = tok.text_vocab_size, tok.decoder_vocab_size
    data = DataConfig(wikimatrix=tuple(world.wikimatrix), image_shards=tuple(world.image_shards),
                      cc6l=(world.cc6l,), ccqa=(world.ccqa,),
                      ratios={"trans": args.trans_ratio, **IMAGE_TASK_RATIOS},
                      image_size=32, image_backend="pil", max_encoder_len=16, max_target_len=24,
                      encoder_tokenizer=tok.text_dir, decoder_tokenizer=tok.decoder_dir,
                      multilingual_fraction=args.multilingual_fraction,
                      batch_size=batch_with_translation(args), num_workers=0, seed=seed)
    return PretrainConfig(
        model=model, data=data, init=InitConfig(clip_dir=clip_dir),
        # A short run on a toy world: a constant learning rate after a brief warm-up and no
        # clipping learn it fastest (the paper's recipe, linear decay, is the trainer's default).
        optim=OptimConfig(lr=args.lr, grad_clip=0.0),
        schedule=ScheduleConfig(steps=args.steps, warmup_steps=min(100, args.steps // 10),
                                decay="constant"),
        run=RunConfig(output_dir=run_dir, seed=seed, device="cpu", precision="fp32"),
        checkpoint=CheckpointConfig(every=args.steps, keep_last=1, resume="never"),
        logging=LoggingConfig(every=25, console=False, tensorboard=False, progress_bar=False))


def with_switches(cfg, switches: dict):
    """``cfg`` with the sections of ``switches`` (a config file's keys, e.g. an ablation
    preset's ``data: {ccqa: []}``) merged over it, through the same loader as every config."""
    from unigen.configuration import _merge, config_from_dict, config_to_dict

    return config_from_dict(type(cfg), _merge(config_to_dict(cfg), switches))


def clear_previous(runs: list[Run]) -> None:
    """A second demo replaces the first: the trainer refuses a run directory that holds
    checkpoints (``resume: never``), so the run directories the demo writes — only those — are
    removed first."""
    for run in runs:
        if os.path.isdir(run.run_dir):
            print(f"[demo] replacing the previous run in {run.run_dir}")
            shutil.rmtree(run.run_dir)


def last_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


def train_and_score(runs: list[Run], *, parallel: int = 2, desc: str = "pre-training") -> None:
    """Train every run, then score its final model on its world's held-out split, ``parallel``
    processes at a time (one thread each). Stops everything at the first failure, naming the
    log to read."""
    from tqdm import tqdm

    from unigen.configuration import save_config

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    pending = list(runs)
    active = {}  # run index -> (run, remaining commands, process, log file)
    total = sum(r.config.schedule.steps for r in runs)
    bar = tqdm(total=total, desc=f"{desc} ({len(runs)} runs, {parallel} at a time)", unit="step")

    def start(commands: list, log) -> subprocess.Popen:
        return subprocess.Popen(commands[0], stdout=log, stderr=subprocess.STDOUT, env=env)

    try:
        while pending or active:
            while pending and len(active) < parallel:
                run = pending.pop(0)
                os.makedirs(run.run_dir, exist_ok=True)
                path = os.path.join(run.run_dir, "train.yaml")
                save_config(run.config, path)
                commands = [[sys.executable, "-m", "unigen.train", "--config", path],
                            [sys.executable, "-m", "unigen.scoring.world", "--model",
                             os.path.join(run.run_dir, "final_model"), "--world", run.world_dir,
                             "--out", run.scores_path]]
                log = open(os.path.join(run.run_dir, "demo.log"), "w")
                active[id(run)] = [run, commands, start(commands, log), log]
            time.sleep(1)
            for key, entry in list(active.items()):
                run, commands, proc, log = entry
                code = proc.poll()
                if code is None:
                    continue
                if code != 0:
                    raise SystemExit(f"{' '.join(commands[0][1:4])} failed for {run.setting} "
                                     f"(seed {run.seed}); see {log.name}")
                commands.pop(0)
                if commands:
                    entry[2] = start(commands, log)
                else:
                    log.close()
                    del active[key]
            done = sum(min(last_step(r.run_dir), r.config.schedule.steps) for r in runs)
            bar.update(done - bar.n)
    finally:
        bar.close()
        for _, _, proc, log in active.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
            log.close()


def read_scores(runs: list[Run]) -> dict:
    """``{setting: {seed: [per-language score dicts]}}`` from the runs' scores.json."""
    out: dict = {}
    for run in runs:
        with open(run.scores_path, encoding="utf-8") as f:
            out.setdefault(run.setting, {})[run.seed] = json.load(f)
    return out


def read_metrics(runs: list[Run]) -> dict:
    """``{setting: {seed: [metrics.jsonl rows]}}``."""
    out: dict = {}
    for run in runs:
        with open(os.path.join(run.run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            out.setdefault(run.setting, {})[run.seed] = [json.loads(line) for line in f]
    return out
