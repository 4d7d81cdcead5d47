"""UniGen pre-training (paper §3.3, §4.2).

    python -m unigen.train --config run.yaml [--section.key=value ...]
    torchrun --nproc_per_node 8 -m unigen.train --config run.yaml

One config (:class:`unigen.training.config.TrainConfig`), read from YAML plus overrides and
saved, resolved, in the run folder. Each process reads its rank from torchrun's environment;
the model is replicated with DDP (or sharded with FSDP2), runs under bf16 autocast on GPUs, and
AdamW updates its trainable parameters (the frozen ViT and decoder blocks are not in the
optimizer). Rank 0 logs and writes checkpoints; SIGINT/SIGTERM save one and exit cleanly, and a
restarted run continues from it exactly (model, optimizer, schedule, RNG, data position).

In-process use (tests, the demo)::

    from unigen.train import train
    result = train(config)          # TrainResult: run_dir, model, history, ...
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field


import numpy as np
import torch

from unigen.configuration import ConfigError, config_from_argv, config_to_dict, save_config
from unigen.model.batch import UniGenBatch
from unigen.model.config import TASK_NAMES as TASKS
from unigen.training import checkpointing as ckpt
from unigen.data.batches import build_training_dataset, finish_batch
from unigen.training.config import TrainConfig
from unigen.training.distributed import (DistEnv, any_rank, all_reduce_sum, average_gradients,
                                         barrier, clip_grad_norm,
                                         full_state_dicts, gather_objects, init_distributed,
                                         load_full_state_dicts, parallelize, teardown_distributed)
from unigen.training.metrics import (MetricLogger, estimate_mfu, peak_flops, peak_memory_gib)
from unigen.training.schedule import build_scheduler

HISTORY_KEYS = ("loss",) + TASKS + ("cl", "temperature", "lr", "grad_norm")
# Columns of the per-step statistics vector (summed over micro-batches, then over ranks).
_TOTAL, _CL, _TEMP, _GNORM = 0, 1, 2, 3
_TASK_LOSS = 4                      # 4..7: per-task loss × target tokens
_TASK_TOK = _TASK_LOSS + len(TASKS)  # 8..11: per-task target tokens
_SAMPLES, _TARGET_TOK, _INPUT_TOK = _TASK_TOK + len(TASKS), _TASK_TOK + len(TASKS) + 1, \
    _TASK_TOK + len(TASKS) + 2
_NCOL = _INPUT_TOK + 1


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``history`` is global, reduced over ranks)."""

    run_dir: str
    """The run folder (resolved config, checkpoints, metrics, final model)."""
    model: torch.nn.Module
    """The trained model (unwrapped from DDP; under FSDP still sharded), on the training device."""
    step: int
    """Optimizer steps completed (including those before a resume)."""
    history: dict[str, list]
    """Per optimizer step, from step 1 (``history["step"]``): ``loss`` (the total objective),
    ``trans``/``cap``/``qus``/``match`` (each task's mean loss over its target tokens, None when
    the step had no sample of that task), ``cl`` (L_CL), ``temperature``, ``lr``, ``grad_norm``
    (before clipping). Resumed runs carry the steps before the resume from the checkpoint."""
    last_checkpoint: str | None = None
    """Path of the newest checkpoint this run wrote (None if it wrote none)."""
    final_model_dir: str | None = None
    """``<run_dir>/final_model`` (``UniGen.from_pretrained``-loadable) when it was written."""
    stopped_by_signal: str | None = None
    """"SIGINT"/"SIGTERM" when a signal stopped the run early, else None."""
    resumed_from: str | None = None
    """The checkpoint this run started from, if any."""
    config: TrainConfig | None = field(default=None, repr=False)


# ---- signals ----------------------------------------------------------------------------------
class _StopRequest:
    """SIGINT/SIGTERM set a flag that the loop checks after each step (so the step finishes, a
    checkpoint is written, and the process exits 0). A second signal restores the previous
    handlers and interrupts at once."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @property
    def name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name


def _worker_ignores_sigint(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group; the workers must keep serving batches while the
    # main process finishes its step and saves, instead of dying with a KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- building blocks --------------------------------------------------------------------------
def _check_runnable(cfg: TrainConfig) -> None:
    """Config problems only visible once we try to run (clear errors naming the keys)."""
    d = cfg.data
    if not any((d.wikimatrix, d.cclm_text_pairs, d.image_shards, d.cc6l, d.ccqa)):
        raise ConfigError("no training data: set data.wikimatrix / data.cclm_text_pairs, "
                          "data.image_shards, data.cc6l, data.ccqa", kind="invalid")
    for key in ("encoder_tokenizer", "decoder_tokenizer"):
        path = getattr(d, key)
        if not path or not os.path.isdir(path):
            raise ConfigError(f"data.{key}: tokenizer directory {path!r} does not exist",
                              kind="invalid")


def _build_model(cfg: TrainConfig, text_tok, dec_tok):
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


def trainable_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters only; weight decay on matrices, none on 1-D parameters (biases,
    norm scales, the temperature): the nanoGPT/CLIP rule."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _build_optimizer(model, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    o = cfg.optim
    impl = o.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(trainable_param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas,
                             eps=o.eps, **kwargs)


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    p = cfg.run.precision
    if p == "auto":
        p = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if p == "bf16" else None


def _resolve_resume(cfg: TrainConfig, root: str) -> str | None:
    r = cfg.checkpoint.resume
    if r == "never":
        if ckpt.list_checkpoints(root):
            raise ConfigError(f"checkpoint.resume is 'never' but {root} already holds "
                              f"checkpoints; use another run.output_dir or resume", kind="invalid")
        return None
    if r == "auto":
        return ckpt.latest_checkpoint(root)
    if not os.path.isdir(r):
        raise ConfigError(f"checkpoint.resume: {r!r} is not a checkpoint directory",
                          kind="invalid")
    return r


# ---- the trainer ------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, env: DistEnv):
        from unigen.data.task_tokenizer import TaskTokenizer
        from unigen.model.tokenizers import load_decoder_tokenizer, load_text_tokenizer

        _check_runnable(cfg)
        self.cfg, self.env = cfg, env
        self.device = env.device
        self.run_dir = cfg.run.output_dir
        self.ckpt_root = ckpt.checkpoint_root(self.run_dir)
        if env.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        barrier(env)

        text_tok = load_text_tokenizer(cfg.data.encoder_tokenizer)
        dec_tok = load_decoder_tokenizer(cfg.data.decoder_tokenizer, cfg.model.tasks.task_tokens)

        # Same initial weights on every rank (DDP also broadcasts rank 0's at wrap time).
        torch.manual_seed(cfg.run.seed)
        self.model = _build_model(cfg, text_tok, dec_tok).to(self.device)
        self.model.train()
        self.num_trainable = self.model.num_parameters(trainable_only=True)
        # Per-rank random sources from here on: dropout and hard-negative sampling differ by rank.
        rank_seed = cfg.run.seed + 1_000_003 * env.rank
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
        np.random.seed(rank_seed % 2**32)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(rank_seed + 17)

        self.step_model, self.replicated = parallelize(self.model, cfg.distributed, env)
        if cfg.run.compile:
            self.step_model = torch.compile(self.step_model)
        self.optimizer = _build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.amp_dtype = _autocast_dtype(cfg, self.device)

        self.tokenizer = TaskTokenizer(encoder=text_tok, decoder=dec_tok,
                                       max_encoder_len=cfg.data.max_encoder_len,
                                       max_target_len=cfg.data.max_target_len)
        self.dataset = build_training_dataset(cfg.data, self.tokenizer, rank=env.rank,
                                              world_size=env.world_size)
        self.image_decoder = None  # DALI in the main process, built at first need
        from unigen.data.mixing import DataPosition

        self.position = DataPosition()
        self.step = 0
        self.history: dict[str, list] = {"step": [], **{k: [] for k in HISTORY_KEYS}}
        self.last_checkpoint: str | None = None
        self.resumed_from: str | None = None
        self.stop = _StopRequest()
        self.logger = MetricLogger(self.run_dir, cfg.logging, enabled=env.is_main,
                                   write=self._write)
        self._pbar = None
        self._pending: list[torch.Tensor] = []
        self._pending_lr: list[float] = []
        self._peak = peak_flops(self.device, self.amp_dtype or torch.float32)

    # -- output on rank 0 (through tqdm so the bar is not torn)
    def _write(self, line: str) -> None:
        if self._pbar is not None:
            self._pbar.write(line)
        else:
            print(line, flush=True)

    # -- resume
    def _resume(self, path: str) -> dict:
        state = ckpt.load_checkpoint(path, self.model)
        trainer = state["trainer"]
        saved_world = len(trainer["ranks"])
        if saved_world != self.env.world_size:
            raise ConfigError(f"checkpoint {path} was written by {saved_world} processes, this "
                              f"run has {self.env.world_size}: exact resuming needs the same "
                              f"world size", kind="invalid")
        load_full_state_dicts(self.model, self.optimizer, state["model"], state["optimizer"],
                              self.cfg.distributed, self.env)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step = int(trainer["step"])
        self.history = {k: list(v) for k, v in trainer["history"].items()}
        mine = trainer["ranks"][self.env.rank]
        self.dataset.load_state_dict(mine["data"])
        self.position.load_state_dict(mine["data"])
        self.resumed_from = path
        return mine["rng"]

    # -- checkpoints
    def save_checkpoint(self) -> str | None:
        self._flush()  # the history saved must be complete up to this step
        rank_state = {"rng": ckpt.capture_rng_state(self.device, self.generator),
                      "data": self.position.state_dict()}
        ranks = gather_objects(rank_state, self.env)
        model_sd, optim_sd = full_state_dicts(self.step_model, self.optimizer,
                                              self.cfg.distributed, self.env)
        path = None
        if self.env.is_main:
            trainer_state = {"step": self.step, "scheduler": self.scheduler.state_dict(),
                             "history": self.history, "ranks": ranks,
                             "world_size": self.env.world_size,
                             "config": config_to_dict(self.cfg)}
            m = self.model
            path = ckpt.save_checkpoint(
                self.ckpt_root, self.step, model_config=m.config, model_state=model_sd,
                optimizer_state=optim_sd, trainer_state=trainer_state,
                keep_last=self.cfg.checkpoint.keep_last, text_tokenizer=m.text_tokenizer,
                decoder_tokenizer=m.decoder_tokenizer)
            self.logger.event(f"checkpoint saved: {path}")
        barrier(self.env)  # nobody runs ahead (or exits) while rank 0 is still writing
        self.last_checkpoint = path
        self._t_last = time.perf_counter()  # don't count the save in the throughput
        return path

    # -- one optimizer step
    def _next_batch(self, it) -> tuple[UniGenBatch, int]:
        """The next model batch and its number of samples (before mined [match] samples)."""
        item = next(it)
        self.position.update(item)
        if item.groups is not None and self.image_decoder is None:
            from unigen.data.image_pipeline import DaliImageDecoder, ImageSpec

            self.image_decoder = DaliImageDecoder(
                ImageSpec(self.cfg.data.image_size, self.cfg.data.interpolation),
                device_id=self.device.index if self.device.type == "cuda" else None)
        batch = finish_batch(item, image_decoder=self.image_decoder,
                             encoder_pad_id=self.tokenizer.encoder_pad_id,
                             decoder_pad_id=self.tokenizer.decoder_pad_id)
        return batch, item.num_samples

    def _train_step(self, it, steps_here: int) -> None:
        cfg, env = self.cfg, self.env
        accum = cfg.optim.grad_accum_steps
        stats = torch.zeros(_NCOL, dtype=torch.float64, device=self.device)
        fsdp = env.is_distributed and cfg.distributed.parallelism == "fsdp"
        ddp = env.is_distributed and cfg.distributed.parallelism == "ddp"
        for micro in range(accum):
            batch, num_samples = self._next_batch(it)
            host = torch.tensor([num_samples, 0,
                                 batch.num_input_tokens(self.model.config.qformer.num_query_tokens)],
                                dtype=torch.float64)
            if steps_here < cfg.run.validate_batches:
                # on the host copy: no device syncs, and a bad batch fails before any compute
                mc = self.model.config
                batch.validate(image_size=mc.vision.image_size,
                               max_text_length=mc.text.max_length,
                               decoder_vocab_size=mc.decoder.vocab_size + len(TASKS))
            batch = batch.to(self.device, non_blocking=True)
            last = micro == accum - 1
            # Gradients are all-reduced only on the last micro-batch of the step.
            if ddp and not last:
                sync = self.step_model.no_sync()
            else:
                sync = contextlib.nullcontext()
            if fsdp:
                self.model.set_requires_gradient_sync(last)
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.step_model(batch, generator=self.generator, validate=False)
                (out.loss / accum).backward()
            tok = torch.tensor([out.num_tokens[t] for t in TASKS], dtype=torch.float64,
                               device=self.device)
            task_loss = torch.stack([out.losses[t].double() for t in TASKS])
            stats[_TOTAL] += out.loss.detach().double() / accum
            stats[_CL] += out.losses["cl"].double() / accum
            stats[_TEMP] += out.temperature.double() / accum
            stats[_TASK_LOSS:_TASK_LOSS + len(TASKS)] += task_loss * tok
            stats[_TASK_TOK:_TASK_TOK + len(TASKS)] += tok
            host[1] = out.num_tokens["total"]
            stats[_SAMPLES:_INPUT_TOK + 1] += host.to(self.device)
        average_gradients(self.replicated, env)  # FSDP: the temperature stays replicated
        gnorm = clip_grad_norm(self.params, cfg.optim.grad_clip or float("inf"))
        stats[_GNORM] = gnorm.double()
        self._pending_lr.append(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._pending.append(stats)

    # -- metrics: one all-reduce per log interval, not per step
    def _flush(self) -> dict | None:
        if not self._pending:
            return None
        stats = torch.stack(self._pending)
        all_reduce_sum(stats, self.env)
        stats = stats.cpu()
        w = self.env.world_size
        first = self.step - len(self._pending) + 1
        for i, row in enumerate(stats.tolist()):
            h = self.history
            h["step"].append(first + i)
            h["loss"].append(row[_TOTAL] / w)
            for j, t in enumerate(TASKS):
                n = row[_TASK_TOK + j]
                h[t].append(row[_TASK_LOSS + j] / n if n > 0 else None)
            h["cl"].append(row[_CL] / w)
            h["temperature"].append(row[_TEMP] / w)
            h["lr"].append(self._pending_lr[i])
            h["grad_norm"].append(row[_GNORM] / w)
        now = time.perf_counter()
        elapsed = max(now - self._t_last, 1e-9)
        tot = stats.sum(0).tolist()
        n = len(self._pending)
        metrics = {"loss/total": tot[_TOTAL] / (w * n)}
        for j, t in enumerate(TASKS):
            metrics[f"loss/{t}"] = (tot[_TASK_LOSS + j] / tot[_TASK_TOK + j]
                                    if tot[_TASK_TOK + j] > 0 else None)
        metrics["loss/cl"] = tot[_CL] / (w * n)
        tokens = tot[_TARGET_TOK] + tot[_INPUT_TOK]
        metrics.update({
            "temperature": self.history["temperature"][-1],
            "lr": self._pending_lr[-1],
            "grad_norm": self.history["grad_norm"][-1],
            "samples_per_s": tot[_SAMPLES] / elapsed,
            "tokens_per_s": tokens / elapsed,
            "target_tokens_per_s": tot[_TARGET_TOK] / elapsed,
            "mfu": estimate_mfu(self.num_trainable, tokens / elapsed, self._peak, w),
            "peak_mem_gib": peak_memory_gib(self.device),
        })
        self._pending, self._pending_lr = [], []
        self._t_last = now
        return metrics

    # -- the loop
    def fit(self) -> TrainResult:
        """Train to ``schedule.steps`` (or ``run.stop_at_step``, or a signal)."""
        try:
            return self._fit()
        finally:
            self.stop.restore()
            if self._pbar is not None:
                self._pbar.close()
                self._pbar = None
            self.logger.close()

    def _fit(self) -> TrainResult:
        cfg, env = self.cfg, self.env
        resume_path = _resolve_resume(cfg, self.ckpt_root)
        rng_state = self._resume(resume_path) if resume_path else None
        if env.is_main:
            save_config(cfg, os.path.join(self.run_dir, "config.yaml"))
        from torch.utils.data import DataLoader

        workers = cfg.data.num_workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers,
                            pin_memory=self.device.type == "cuda",
                            worker_init_fn=_worker_ignores_sigint if workers else None,
                            prefetch_factor=4 if workers else None)
        it = iter(loader)
        # Creating the loader iterator draws from the global RNG; restoring after it makes the
        # resumed run's random state equal the uninterrupted run's at this step.
        if rng_state is not None:
            ckpt.restore_rng_state(rng_state, self.device, self.generator)
            self.logger.event(f"resumed from {resume_path} at step {self.step}")
        total = cfg.schedule.steps
        if cfg.run.stop_at_step:
            total = min(total, cfg.run.stop_at_step)
        if env.is_main and cfg.logging.progress_bar:
            try:
                from tqdm.auto import tqdm
                self._pbar = tqdm(total=total, initial=self.step, desc="train",
                                  dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._pbar = None
        self.stop.install()
        saved_at = self.step if resume_path else -1
        steps_here = 0
        self._t_last = time.perf_counter()
        while self.step < total:
            self._train_step(it, steps_here)
            steps_here += 1
            if self._pbar is not None:
                self._pbar.update(1)
            if self.step % cfg.logging.every == 0 or self.step == total:
                metrics = self._flush()
                if metrics is not None:
                    self.logger.log(self.step, metrics)
                    if self._pbar is not None:
                        self._pbar.set_postfix(loss=f"{metrics['loss/total']:.4f}",
                                               refresh=False)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                self.save_checkpoint()
                saved_at = self.step
            if any_rank(self.stop.signum is not None, env):
                break
        stopped = None
        if self.step < total:
            stopped = self.stop.name or "a signal on another rank"
        metrics = self._flush()
        if metrics is not None:
            self.logger.log(self.step, metrics)
        if cfg.checkpoint.save_on_exit and saved_at != self.step:
            self.save_checkpoint()
        if stopped:
            self.logger.event(f"stopped by {stopped} at step {self.step}")
        final_dir = None
        if cfg.run.save_final_model and self.step == cfg.schedule.steps:
            final_dir = self._save_final_model()
        return TrainResult(run_dir=self.run_dir, model=self.model, step=self.step,
                           history=self.history, last_checkpoint=self.last_checkpoint,
                           final_model_dir=final_dir, stopped_by_signal=stopped,
                           resumed_from=self.resumed_from, config=cfg)

    def _save_final_model(self) -> str:
        path = os.path.join(self.run_dir, "final_model")
        model_sd, _ = full_state_dicts(self.step_model, self.optimizer, self.cfg.distributed,
                                       self.env) if self.cfg.distributed.parallelism == "fsdp" \
            else (None, None)
        if self.env.is_main:
            m = self.model
            if model_sd is None:
                model_sd = m.state_dict()
            ckpt.write_pretrained(path, m.config, model_sd, m.text_tokenizer,
                                  m.decoder_tokenizer)
            self.logger.event(f"final model saved: {path}")
        barrier(self.env)
        return path


def train(config: TrainConfig) -> TrainResult:
    """Train with ``config`` in this process (one rank of a torchrun job, or alone)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config must be a TrainConfig, got {type(config).__name__}")
    env = init_distributed(config.distributed, config.run)
    try:
        return Trainer(config, env).fit()
    finally:
        teardown_distributed(env)


def main(argv: list[str] | None = None) -> int:
    """``python -m unigen.train --config FILE [--section.key=value ...]``; returns the exit
    status (2 for a bad config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    env = None
    try:
        config = config_from_argv(TrainConfig, argv)
        env = init_distributed(config.distributed, config.run)
        result = Trainer(config, env).fit()
        if env.is_main:
            print(f"[unigen.train] done: {result.step} steps, run folder {result.run_dir}"
                  + (f" (stopped by {result.stopped_by_signal})" if result.stopped_by_signal
                     else ""), flush=True)
        return 0
    except (ConfigError, FileNotFoundError) as e:
        print(f"unigen.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        teardown_distributed(env)


if __name__ == "__main__":
    sys.exit(main())
