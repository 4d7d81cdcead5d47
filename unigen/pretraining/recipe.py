"""UniGen pre-training (paper §3.3, §4.2) as a recipe on the training core.

What is particular to pre-training: the model is built from ``model`` (or pre-trained parts,
``init``) with its two tokenizers; the data is the endless mixed-task stream of
:func:`unigen.data.batches.build_training_dataset`, resumed through its data position; a
micro-batch's objective is ``L = L_trans + L_cap + α·L_qus + β·L_match + L_CL``; beside the
loss it logs each task's loss (mean over its target tokens), L_CL, τ, tokens/s and MFU; a
completed run writes ``<output_dir>/final_model``.
"""

from __future__ import annotations

import math
import os
import sys

import torch

from unigen.configuration import ConfigError
from unigen.data.batches import build_training_dataset, finish_batch
from unigen.data.build import open_training_store
from unigen.data.check import check_sources
from unigen.data.drops import DroppedSampleMonitor, TooManyDroppedSamples
from unigen.data.errors import DataFormatError
from unigen.data.feature_store import check_store_vit
from unigen.data.mixing import DataPosition, interleave_max_gap
from unigen.data.sizes import image_pair_count
from unigen.data.task_tokenizer import TaskTokenizer
from unigen.model.config import TASK_NAMES
from unigen.model.pretrained import WEIGHTS_NAME
from unigen.training.checkpointing import MODEL_DIR
from unigen.training.distributed import init_distributed, teardown_distributed
from unigen.training.metrics import estimate_mfu, peak_flops
from unigen.training.recipe import Recipe, StepOutput
from unigen.training.signals import worker_ignores_sigint
from unigen.training.trainer import Trainer, TrainResult

from .config import PretrainConfig
from .synthetic import with_synthetic_world

HISTORY_KEYS = ("loss",) + TASK_NAMES + ("cl", "temperature", "lr", "grad_norm")
# Columns of the recipe's per-step statistics (summed over micro-batches, then over ranks).
_CL, _TEMP = 0, 1
_TASK_LOSS = 2                           # 2..5: per-task loss × target tokens
_TASK_TOK = _TASK_LOSS + len(TASK_NAMES)  # 6..9: per-task target tokens
_TARGET_TOK, _INPUT_TOK = _TASK_TOK + len(TASK_NAMES), _TASK_TOK + len(TASK_NAMES) + 1
_DROPPED = _INPUT_TOK + 1


def _check_runnable(cfg: PretrainConfig) -> None:
    """Config problems only visible once we try to run (clear errors naming the keys)."""
    d = cfg.data
    if not any((d.wikimatrix, d.cclm_text_pairs, d.image_shards, d.cc6l, d.ccqa)):
        raise ConfigError("no training data: set data.wikimatrix / data.cclm_text_pairs, "
                          "data.image_shards, data.cc6l, data.ccqa, or synthetic.dir (a first "
                          "run on the synthetic world: --config configs/tiny.yaml)",
                          kind="invalid")
    for key in ("encoder_tokenizer", "decoder_tokenizer"):
        path = getattr(d, key)
        if not path or not os.path.isdir(path):
            raise ConfigError(f"data.{key}: tokenizer directory {path!r} does not exist",
                              kind="invalid")
    check_sources(d)  # file names, language pairs, readable shards: before any run folder


def _build_model(cfg: PretrainConfig, text_tok, dec_tok):
    from unigen.model.unigen_model import UniGen

    init = cfg.init
    if init.from_pretrained:
        model = UniGen.from_pretrained(init.from_pretrained, load_tokenizers=False)
    elif init.uses_parts:
        model = UniGen.from_pretrained_parts(
            clip_dir=init.clip_dir or None, xlmr_dir=init.xlmr_dir or None,
            gpt2_dir=init.gpt2_dir or None, qformer_checkpoint=init.qformer_checkpoint or None,
            config=cfg.model, load_tokenizers=False)
    else:
        model = UniGen(cfg.model)
    mc = model.config
    if len(text_tok) > mc.text.vocab_size:
        raise ConfigError(f"the encoder tokenizer ({cfg.data.encoder_tokenizer}) has "
                          f"{len(text_tok)} tokens, more than model.text.vocab_size = "
                          f"{mc.text.vocab_size}", kind="invalid")
    try:
        model.set_tokenizers(text_tok, dec_tok)
    except ValueError as e:
        raise ConfigError(f"{e} (the decoder tokenizer in {cfg.data.decoder_tokenizer} has "
                          f"{len(dec_tok) - len(mc.tasks.task_tokens)} base tokens: set "
                          f"model.decoder.vocab_size to that)", kind="invalid") from None
    return model


class PretrainRecipe(Recipe):
    name = "unigen.train"
    resume_hint = "the next launch resumes from its checkpoint (checkpoint.resume: auto)"
    stat_names = ("cl", "temperature", *(f"{t}_loss_x_tokens" for t in TASK_NAMES),
                  *(f"{t}_tokens" for t in TASK_NAMES), "target_tokens", "input_tokens",
                  "dropped")
    data_errors = (DataFormatError, TooManyDroppedSamples)
    loss_columns = (*TASK_NAMES, "cl")
    # the checkpoint holds this model and its data position: a change is a new run
    resume_fixed_keys = ("model", "init", "data", "synthetic")

    def __init__(self, cfg: PretrainConfig):
        from unigen.model.tokenizers import load_decoder_tokenizer, load_text_tokenizer

        if not isinstance(cfg, PretrainConfig):
            raise TypeError(f"PretrainRecipe: config must be a PretrainConfig, got "
                            f"{type(cfg).__name__}")
        _check_runnable(cfg)
        self.cfg = cfg
        self.text_tok = load_text_tokenizer(cfg.data.encoder_tokenizer)
        self.dec_tok = load_decoder_tokenizer(cfg.data.decoder_tokenizer,
                                              cfg.model.tasks.task_tokens)
        self.tokenizer = TaskTokenizer(encoder=self.text_tok, decoder=self.dec_tok,
                                       max_encoder_len=cfg.data.max_encoder_len,
                                       max_target_len=cfg.data.max_target_len)
        self.position = DataPosition()
        self.drops = DroppedSampleMonitor(cfg.data.max_dropped_fraction,
                                          report=self._report_drop)
        self.dropped_total = 0  # over every process, from the log intervals
        self.image_decoder = None  # DALI in the main process, built at first need
        # data.image_features: opened and checked against the data options before any run
        # folder is made; against the model's ViT once it is built
        self.feature_store = open_training_store(cfg.data) if cfg.data.image_features else None

    def setup(self, trainer) -> None:
        super().setup(trainer)
        self.dataset = build_training_dataset(self.cfg.data, self.tokenizer,
                                              rank=self.env.rank,
                                              world_size=self.env.world_size,
                                              feature_store=self.feature_store)

    def build_model(self):
        self.model = _build_model(self.cfg, self.text_tok, self.dec_tok)
        if self.feature_store is not None:
            check_store_vit(self.feature_store, self.model, self.trainer.amp_dtype)
        self.num_trainable = self.model.num_parameters(trainable_only=True)
        self.peak = peak_flops(self.env.device, self.trainer.amp_dtype or torch.float32)
        return self.model

    def describe(self) -> list[str]:
        d, mc = self.cfg.data, self.model.config
        total = self.model.num_parameters(trainable_only=False)
        sources = [f"{name} ({len(paths)})" for name, paths in (
            ("WikiMatrix", d.wikimatrix), ("CCLM text pairs", d.cclm_text_pairs),
            ("image shards", d.image_shards), ("CC6L", d.cc6l), ("CCQA", d.ccqa)) if paths]
        init = self.cfg.init
        start = (f"from {init.from_pretrained}" if init.from_pretrained
                 else "from pre-trained parts" if init.uses_parts else "randomly initialised")
        return [f"UniGen, {self.num_trainable:,} trainable of {total:,} parameters, {start} "
                f"(decoder vocabulary {mc.decoder.vocab_size} + {len(TASK_NAMES)} task tokens)",
                f"data: tasks {', '.join(f'{t} {r:g}' for t, r in d.ratios.items())} "
                f"({d.mixing} mixing) from {', '.join(sources)}; "
                f"{d.num_workers} loader worker(s) per process"]

    def micro_batch_size(self) -> int:
        return self.cfg.data.batch_size

    def every_parameter_used(self) -> bool:
        """A [match] sample in every micro-batch, with L_CL on, reaches every trainable part:
        both encoders, the Q-Former, the decoder and the contrastive projections (checked
        under DDP with every other task switched off). Only interleaved mixing promises one
        per batch; random mixing may draw a batch without."""
        d = self.cfg.data
        if d.mixing != "interleave" or "match" not in d.ratios \
                or self.model.config.loss.contrastive_weight <= 0:
            return False
        return interleave_max_gap(d.ratios, "match") <= d.batch_size

    def new_run_hint(self, checkpoint: str) -> str:
        model = os.path.join(checkpoint, MODEL_DIR)
        if os.path.isfile(os.path.join(model, WEIGHTS_NAME)):  # a full checkpoint
            return f"--init.from_pretrained={model} starts one from its weights"
        exported = checkpoint.rstrip(os.sep) + "-model"
        return (f"its weights are sharded: python -m unigen.training.export {checkpoint} "
                f"{exported}, then --init.from_pretrained={exported}")

    # ---- data ------------------------------------------------------------------------------
    def micro_batches_per_epoch(self) -> int | None:
        """With ``schedule.epochs``: micro-batches per process of one epoch, an epoch being
        as many samples (every task together) as ``data.image_shards`` holds image-text pairs
        — the paper's "30 epochs" of CC3M (§4.1-4.2) at its global batch. The task streams
        themselves stay endless (each cycles its source); the epochs set the run's length,
        the schedule's decay, and an end-of-epoch checkpoint."""
        if not self.cfg.schedule.epochs:
            return None
        d = self.cfg.data
        pairs = image_pair_count(d.image_shards)
        if pairs == 0:
            raise ConfigError("schedule.epochs: data.image_shards hold no image-text pair",
                              kind="invalid")
        per_epoch = math.ceil(pairs / (d.batch_size * self.env.world_size))
        self.trainer.log(f"schedule.epochs: {pairs} image-text pairs in data.image_shards, "
                         f"{d.batch_size * self.env.world_size} samples per micro-batch over "
                         f"{self.env.world_size} process(es): {per_epoch} micro-batches per "
                         f"epoch")
        return per_epoch

    def batches(self, epoch: int, done: int):
        from torch.utils.data import DataLoader

        workers = self.cfg.data.num_workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                            pin_memory=self.env.device.type == "cuda",
                            worker_init_fn=worker_ignores_sigint if workers else None,
                            prefetch_factor=4 if workers else None)
        return self._model_batches(iter(loader))

    def _model_batches(self, items):
        """(UniGenBatch, samples) per loader item, recording the data position as it goes."""
        device = self.env.device
        for item in items:
            self.position.update(item)
            if item.groups is not None and self.image_decoder is None:
                from unigen.data.build import image_spec
                from unigen.data.image_pipeline import DaliImageDecoder

                self.image_decoder = DaliImageDecoder(
                    image_spec(self.cfg.data, self.env.rank),
                    device_id=device.index if device.type == "cuda" else None)
            batch = finish_batch(item, image_decoder=self.image_decoder,
                                 encoder_pad_id=self.tokenizer.encoder_pad_id,
                                 decoder_pad_id=self.tokenizer.decoder_pad_id)
            self.drops.update(item.num_samples, batch.num_images, item.dropped_samples)
            yield batch, item.num_samples, item.dropped

    def _report_drop(self, line: str) -> None:
        if self.env.is_main:
            self.trainer.log(line)
        else:
            print(f"[{self.name} rank {self.env.rank}] {line}", file=sys.stderr, flush=True)

    def rank_state(self) -> dict:
        return {**self.position.state_dict(), "drops": self.drops.state_dict()}

    def load_rank_state(self, state: dict) -> None:
        self.drops.load_state_dict(state.get("drops", {}))
        self.dataset.load_state_dict(state)
        self.position.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"dropped_total": self.dropped_total}

    def load_state_dict(self, state: dict) -> None:
        self.dropped_total = int(state.get("dropped_total", 0))

    # ---- a step ----------------------------------------------------------------------------
    def forward(self, model, item, generator, validate: bool) -> StepOutput:
        batch, num_samples, dropped = item
        mc = self.model.config
        device = self.env.device
        input_tokens = batch.num_input_tokens(mc.qformer.num_query_tokens)
        if validate:
            # on the host copy: no device syncs, and a bad batch fails before any compute
            batch.validate(image_size=mc.vision.image_size, max_text_length=mc.text.max_length,
                           decoder_vocab_size=mc.decoder.vocab_size + len(TASK_NAMES),
                           text_vocab_size=mc.text.vocab_size)
        layout = self.model.step_layout(batch)  # host shapes: the step then reads no device value
        batch = batch.to(device, non_blocking=True)
        out = model(batch, generator=generator, validate=False, layout=layout)
        accum = self.cfg.optim.grad_accum_steps
        # the counts are host numbers (from the batch's layout): one copy without waiting
        host = torch.tensor([out.num_tokens[t] for t in TASK_NAMES]
                            + [out.num_tokens["total"], input_tokens, dropped],
                            dtype=torch.float64).to(device, non_blocking=True)
        tok = host[:len(TASK_NAMES)]
        task_loss = torch.stack([out.losses[t].double() for t in TASK_NAMES])
        stats = torch.cat([(out.losses["cl"].double() / accum).reshape(1),
                           (out.temperature.double() / accum).reshape(1),
                           task_loss * tok, tok, host[len(TASK_NAMES):]])
        return StepOutput(out.loss, num_samples, stats)

    # ---- logging ---------------------------------------------------------------------------
    def history_row(self, stats: list[float], world_size: int) -> dict:
        row = {"cl": stats[_CL] / world_size, "temperature": stats[_TEMP] / world_size}
        for j, t in enumerate(TASK_NAMES):
            n = stats[_TASK_TOK + j]
            row[t] = stats[_TASK_LOSS + j] / n if n > 0 else None
        return row

    def interval_metrics(self, stats: list[float], steps: int, seconds: float,
                         history: dict) -> dict:
        w = self.env.world_size
        metrics = {}
        for j, t in enumerate(TASK_NAMES):
            n = stats[_TASK_TOK + j]
            metrics[f"loss/{t}"] = stats[_TASK_LOSS + j] / n if n > 0 else None
        metrics["loss/cl"] = stats[_CL] / (w * steps)
        # every process gets the same reduced stats, so every process's total agrees
        self.dropped_total += int(stats[_DROPPED])
        metrics["data/dropped"] = int(stats[_DROPPED])
        metrics["data/dropped_total"] = self.dropped_total
        tokens = stats[_TARGET_TOK] + stats[_INPUT_TOK]
        metrics.update({
            "temperature": history["temperature"][-1],
            "tokens_per_s": tokens / seconds,
            "target_tokens_per_s": stats[_TARGET_TOK] / seconds,
            "mfu": estimate_mfu(self.num_trainable, tokens / seconds, self.peak, w),
        })
        return metrics

    # ---- the end ---------------------------------------------------------------------------
    def finish(self, trainer) -> str | None:
        if not self.cfg.run.save_final_model:
            return None
        return trainer.save_model(os.path.join(trainer.run_dir, "final_model"))


def pretrain(config: PretrainConfig, *, log=None) -> TrainResult:
    """Pre-train with ``config`` in this process (one rank of a torchrun job, or alone)."""
    if not isinstance(config, PretrainConfig):
        raise TypeError(f"pretrain: config must be a PretrainConfig, got "
                        f"{type(config).__name__}")
    env = init_distributed(config.distributed, config.run)
    try:
        if config.synthetic.dir:
            def say(line: str) -> None:  # as the trainer's event lines (rank 0, console on)
                if config.logging.console:
                    (log or print)(f"[{PretrainRecipe.name}] {line}")

            config = with_synthetic_world(config, env, log=say)
        return Trainer(PretrainRecipe(config), config, env, log=log).fit()
    finally:
        teardown_distributed(env)
