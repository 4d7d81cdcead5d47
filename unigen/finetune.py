"""Fine-tuning a pre-trained UniGen on an IGLUE task (paper §4.2 "fine-tuning phase", §4.3).

    python -m unigen.finetune --task xvnli --model ckpt/ --train XVNLI/annotations/en/train.jsonl \\
        --images flickr30k-images/ --out runs/xvnli-en [--dev .../en/dev.jsonl] [--epochs 10]

The tasks keep UniGen's single generative objective: XVNLI, xGQA and MaRVL/NLVR2 are [qus]
samples (image ⊕ encoder text ⊕ [qus] → the keyword or the answer, the same fused
cross-entropy as pre-training); xFlickr&CO trains the retrieval heads, L_CL with mined
hard negatives and the [match] task built from them (file formats: :mod:`unigen.iglue.readers`).
The paper's settings are the defaults: AdamW (β = 0.9, 0.98), learning rate 3e-5 without
warm-up (held constant: ``--decay linear|cosine`` and ``--warmup-steps`` give pre-training's
schedule instead), 10 epochs, bf16 autocast on GPUs. Zero-shot transfer fine-tunes on the
English files and evaluates on the others (``python -m unigen.evaluate``); few-shot continues
from that model on a target language's ``train_<n>`` file.

With ``--dev`` files the model is scored after every epoch and ``<out>/model`` keeps the best
epoch (mean of the dev files' headline metric); without, it is the last epoch's. ``<out>``
also gets ``log.jsonl`` (loss every ``--log-every`` steps, dev scores per epoch) and
``finetune_config.json``.

Under ``torchrun --nproc_per_node N -m unigen.finetune ...`` (the paper fine-tuned retrieval on
8 GPUs) each process takes one GPU and ``--batch-size`` examples of every global batch of
``batch_size × N``; DDP averages the gradients, L_CL's features are gathered over all
processes (negatives from the global batch), and rank 0 logs, scores the dev files and writes.

``<out>/checkpoint.pt`` (the trainable weights, AdamW's state, the random generators and the
position in the epoch) is rewritten every ``--save-every`` steps and after every epoch;
``--resume`` continues an interrupted run from it, on the same batches in the same order (each
epoch's order is drawn from the seed and the epoch alone), and a larger ``--epochs`` extends a
finished one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from unigen.iglue.images import ImageResolver
from unigen.iglue.readers import IGLUE_TASKS, IGLUERecord, check_task, read_iglue
from unigen.data.examples import Example, collate_examples

@dataclass
class FinetuneConfig:
    """Everything one fine-tuning run needs (the command line's flags, same names)."""

    task: str
    model: str                       # a directory written by UniGen.save_pretrained
    train: list[str]                 # IGLUE files of the task
    images: str                      # image root of the train (and dev) files
    out: str                         # run directory (created; must not hold a model yet)
    dev: list[str] = field(default_factory=list)
    epochs: int = 10
    lr: float = 3e-5
    decay: str = "constant"          # after warm-up: constant (the paper), linear or cosine
    warmup_steps: int = 0            # linear warm-up (the paper: none)
    min_lr_ratio: float = 0.0        # linear/cosine: lr at the last step, as a fraction of lr
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    grad_clip: float = 1.0           # max gradient norm; 0 = no clipping
    batch_size: int = 32             # per process under torchrun
    workers: int = 2                 # DataLoader processes decoding images
    device: str = "auto"             # "auto" = cuda when available
    precision: str = "auto"          # "auto" = bf16 autocast on cuda, fp32 elsewhere; or bf16/fp32
    seed: int = 0
    log_every: int = 50
    max_new_tokens: int = 8          # dev scoring: answer length
    num_beams: int = 1
    k: int = 16                      # dev scoring (retrieval): candidates re-ranked by [match]
    decode: str = "generate"         # dev scoring: generate, or rank the keywords (xvnli, marvl)
    save_every: int = 1000           # steps between checkpoints (also one after every epoch)
    resume: bool = False             # continue from <out>/checkpoint.pt
    stop_at_step: int = 0            # checkpoint and stop after this step (0: run to the end)

    def check(self) -> None:
        check_task(self.task, "finetune")
        for name in ("epochs", "batch_size", "log_every", "max_new_tokens", "num_beams", "k",
                     "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"finetune: {name} must be a positive int, got {v!r}")
        if not isinstance(self.stop_at_step, int) or self.stop_at_step < 0:
            raise ValueError(f"finetune: stop_at_step must be an int >= 0, got "
                             f"{self.stop_at_step!r}")
        if not isinstance(self.workers, int) or self.workers < 0:
            raise ValueError(f"finetune: workers must be an int >= 0, got {self.workers!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            bad = not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0
            if bad or (name == "lr" and v == 0):
                raise ValueError(f"finetune: {name} must be a finite number "
                                 f"{'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        from unigen.iglue.scoring import check_decode

        check_decode(self.task, self.decode, "finetune")
        if self.decay not in ("constant", "linear", "cosine"):
            raise ValueError(f"finetune: decay must be constant, linear or cosine, got "
                             f"{self.decay!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"finetune: warmup_steps must be an int >= 0, got "
                             f"{self.warmup_steps!r}")
        if not (isinstance(self.min_lr_ratio, (int, float)) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(f"finetune: min_lr_ratio must be in [0, 1], got "
                             f"{self.min_lr_ratio!r}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"finetune: precision must be auto, bf16 or fp32, got "
                             f"{self.precision!r}")
        if not self.train:
            raise ValueError("finetune: train names no file")
        if not self.resume and os.path.exists(os.path.join(self.out, "model", "config.json")):
            raise FileExistsError(f"finetune: {self.out!r} already holds a fine-tuned model; "
                                  f"choose another --out (or --resume an interrupted run)")


@dataclass
class FinetuneResult:
    model: object                    # the UniGen of <out>/model (best dev epoch, or last)
    out: str
    history: list[dict]              # logged steps
    dev: list[dict]                  # per epoch: {"epoch", "score", "files": {path: metrics}}
    best_epoch: int | None


class _Examples(torch.utils.data.Dataset):
    """Records as collate-ready :class:`Example` s: one per record, or one per caption for
    retrieval (each caption pairs with its image; an image's captions are positives)."""

    def __init__(self, task: str, records: list[IGLUERecord], resolver: ImageResolver, size: int):
        self.task, self.records, self.resolver, self.size = task, records, resolver, size
        self.items = [(r, t) for r, rec in enumerate(records)
                      for t in range(len(rec.texts) if task == "xflickrco" else 1)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Example:
        r, t = self.items[i]
        rec = self.records[r]
        image = self.resolver.tensor(rec.images, self.size)
        if self.task == "xflickrco":
            return Example(None, image=image, image_id=rec.images, pair_text=rec.texts[t])
        return Example("qus", target=rec.answer, image=image, text=rec.texts[0],
                       image_id=rec.images)


class _BatchOrder(torch.utils.data.Sampler):
    """This process's share of the global batches of a fresh permutation per epoch, drawn from
    (seed, epoch) alone: a resumed run sees the same batches in the same order and skips the
    ones already done, and the ``world`` processes split each global batch of
    ``batch_size × world`` examples into equal parts (rank r takes part r)."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, rank: int = 0,
                 world: int = 1):
        self.n, self.batch_size, self.drop_last, self.seed = n, batch_size, drop_last, seed
        self.rank, self.world = rank, world
        self.epoch, self.skip = 1, 0

    def start(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:  # batches of a whole epoch
        g = self.batch_size * self.world
        return self.n // g if self.drop_last else -(-self.n // g)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(
            self.seed * 100_003 + self.epoch)).tolist()
        g = self.batch_size * self.world
        for b in range(self.skip, len(self)):
            start = b * g + self.rank * self.batch_size
            yield order[start:start + self.batch_size]


def _trainable_state(model) -> dict:
    # The frozen parts (the ViT, the frozen decoder blocks) come back from --model on resume.
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _restore(state: dict, path: str, model, optimizer, mining, device, rank: int) -> None:
    """Weights, AdamW's state and this process's random generators from a checkpoint."""
    missing = set(model.load_state_dict(state["model"], strict=False).missing_keys)
    if any(p.requires_grad for n, p in model.named_parameters() if n in missing):
        raise ValueError(f"finetune: {path} lacks trainable parameters of this model")
    optimizer.load_state_dict(state["optimizer"])
    mining.set_state(state["mining"][rank])
    torch.set_rng_state(state["torch_rng"][rank])
    if device.type == "cuda" and state["cuda_rng"][rank] is not None:
        torch.cuda.set_rng_state(state["cuda_rng"][rank], device)


def _score_dev(model, files, resolver, cfg: FinetuneConfig, device, amp: bool):
    """(mean headline metric, {path: metrics}) of the dev files."""
    from unigen.iglue.scoring import evaluate_file, headline

    scores = {}
    for f in files:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            scores[f.path], _ = evaluate_file(model, f, resolver, batch_size=cfg.batch_size,
                                              max_new_tokens=cfg.max_new_tokens,
                                              num_beams=cfg.num_beams, k=cfg.k,
                                              workers=cfg.workers, decode=cfg.decode)
    return sum(headline(cfg.task, m) for m in scores.values()) / len(scores), scores


def _logged_before(entry: dict, run: dict) -> bool:
    if "dev" in entry:
        return entry["dev"]["epoch"] < run["epoch"]
    return entry["step"] <= run["step"]


def _save_checkpoint(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing leaves the previous checkpoint intact


def _read_files(task: str, paths: list[str], what: str, log) -> list:
    files = []
    for p in paths:
        f = read_iglue(task, p)
        log(f"{what} {p}: {len(f.records)} records"
            + (f" ({f.skipped} skipped: no usable label)" if f.skipped else ""))
        files.append(f)
    return files


def _start_processes(cfg: FinetuneConfig):
    """(device, DistEnv): under torchrun (WORLD_SIZE > 1) one process per device, the process
    group up (NCCL on GPUs, gloo on CPUs); else this one process on ``cfg.device``."""
    from unigen.training.config import DistributedConfig, RunConfig
    from unigen.training.distributed import DistEnv, init_distributed, resolve_device

    world = os.environ.get("WORLD_SIZE", "1")
    if world in ("", "1"):
        device = resolve_device(cfg.device)
        return device, DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    if cfg.device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"finetune: under torchrun the device must be auto, cuda or cpu (each "
                         f"process takes its LOCAL_RANK's GPU), got {cfg.device!r}")
    env = init_distributed(DistributedConfig(), RunConfig(device=cfg.device))
    return env.device, env


def finetune(cfg: FinetuneConfig, *, log=print) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.train``; write ``cfg.out`` (module docstring). Under
    torchrun every process runs this; rank 0 logs, scores the dev files and writes."""
    from unigen.training.distributed import teardown_distributed

    cfg.check()
    device, env = _start_processes(cfg)
    try:
        return _finetune(cfg, device, env, log)
    finally:
        teardown_distributed(env)


def _finetune(cfg: FinetuneConfig, device: torch.device, env, log) -> FinetuneResult:
    from unigen.model.unigen_model import UniGen
    from unigen.training.optim import trainable_param_groups
    from unigen.training.config import DistributedConfig, ScheduleConfig
    from unigen.training.distributed import (all_reduce_sum, barrier, gather_objects,
                                             parallelize)
    from unigen.training.schedule import lr_multiplier

    rank, world = env.rank, env.world_size
    main = rank == 0
    say = log if main else (lambda _: None)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    amp = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    resolver = ImageResolver(cfg.images)
    train_files = _read_files(cfg.task, cfg.train, "train", say)
    dev_files = _read_files(cfg.task, cfg.dev, "dev", say)

    model = UniGen.from_pretrained(cfg.model).to(device)
    if model.text_tokenizer is None or model.decoder_tokenizer is None:
        raise ValueError(f"finetune: {cfg.model!r} holds no tokenizers (save the model with "
                         f"them attached)")
    mc = model.config
    records = [r for f in train_files for r in f.records]
    data = _Examples(cfg.task, records, resolver, mc.vision.image_size)
    retrieval = cfg.task == "xflickrco"
    if len(data) < max(world, 2 if retrieval else 1):
        raise ValueError(f"finetune: {len(data)} training examples are too few"
                         + (" for retrieval (at least 2 image-caption pairs)" if retrieval
                            else f" for {world} processes"))
    batch_size = min(cfg.batch_size, len(data) // world)
    collate = functools.partial(collate_examples, text_tokenizer=model.text_tokenizer,
                                decoder_tokenizer=model.decoder_tokenizer,
                                image_size=mc.vision.image_size, image_mean=mc.vision.image_mean,
                                image_std=mc.vision.image_std, max_text_length=mc.text.max_length)
    if cfg.workers:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers fork-safety
    # A retrieval batch of one pair has no in-batch negative, and the processes must all take
    # the same number of steps: the last batch is dropped when it could be short.
    order = _BatchOrder(len(data), batch_size, drop_last=retrieval or world > 1, seed=cfg.seed,
                        rank=rank, world=world)
    loader = torch.utils.data.DataLoader(data, batch_sampler=order, collate_fn=collate,
                                         num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda")
    step_model, _ = parallelize(model, DistributedConfig(), env)  # DDP under torchrun
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(trainable_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=tuple(cfg.betas), **kwargs)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    # The pre-training schedule, a pure function of the step (so resuming needs only the step).
    schedule = ScheduleConfig(steps=len(order) * cfg.epochs, warmup_steps=cfg.warmup_steps,
                              decay=cfg.decay, min_lr_ratio=cfg.min_lr_ratio)
    # Per-process random sources (dropout, hard-negative sampling), as in pre-training.
    torch.manual_seed(cfg.seed + 1_000_003 * rank)
    mining = torch.Generator(device=device).manual_seed(cfg.seed + 1_000_003 * rank + 17)

    if main:
        os.makedirs(cfg.out, exist_ok=True)
    barrier(env)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    model_dir = os.path.join(cfg.out, "model")
    run = {"history": [], "dev": [], "best": -1.0, "best_epoch": None, "step": 0,
           "epoch": 1, "batches_done": 0}
    if cfg.resume and os.path.isfile(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        changed = [k for k in ("task", "model", "train", "dev", "images", "batch_size", "seed")
                   if state["config"][k] != asdict(cfg)[k]]
        if state.get("world", 1) != world:
            changed.append(f"number of processes ({state.get('world', 1)} then)")
        if changed:
            raise ValueError(f"finetune: --resume with other {', '.join(changed)} than the "
                             f"checkpoint's run; start a new --out instead")
        _restore(state, ckpt_path, model, optimizer, mining, device, rank)
        run = state["run"]
        if main and os.path.isfile(log_path):
            # drop what was logged after the checkpoint (a crash's last steps): redone below
            with open(log_path, encoding="utf-8") as f:
                kept = [line for line in f if _logged_before(json.loads(line), run)]
            with open(log_path, "w", encoding="utf-8") as f:
                f.writelines(kept)
        say(f"resumed from {ckpt_path}: epoch {run['epoch']}, {run['batches_done']} of "
            f"{len(order)} batches done, step {run['step']}")
    elif cfg.resume:
        say(f"--resume: no {ckpt_path} yet, starting from {cfg.model}")
    if main:
        with open(os.path.join(cfg.out, "finetune_config.json"), "w", encoding="utf-8") as f:
            json.dump(asdict(cfg), f, indent=2)
    say(f"fine-tuning {cfg.task} on {len(data)} examples ({len(records)} records), "
        f"{len(order)} steps/epoch × {cfg.epochs} epochs, batch {batch_size}"
        + (f" per process × {world} processes" if world > 1 else "")
        + f", lr {cfg.lr} ({cfg.decay}"
        + (f", {cfg.warmup_steps} warm-up steps" if cfg.warmup_steps else "")
        + f"), {device.type}{' bf16' if amp else ''}")

    def checkpoint(epoch, batches_done):
        run.update(epoch=epoch, batches_done=batches_done)
        rngs = gather_objects((mining.get_state(), torch.get_rng_state(),
                               torch.cuda.get_rng_state(device) if device.type == "cuda"
                               else None), env)
        if main:
            _save_checkpoint(ckpt_path, {
                "config": asdict(cfg), "world": world, "model": _trainable_state(model),
                "optimizer": optimizer.state_dict(), "run": run,
                "mining": [r[0] for r in rngs], "torch_rng": [r[1] for r in rngs],
                "cuda_rng": [r[2] for r in rngs]})

    history, dev_scores, validated, stopping = run["history"], run["dev"], False, False
    logf = open(log_path, "a" if cfg.resume else "w", encoding="utf-8") if main else None

    def record(entry):
        if logf is not None:
            logf.write(json.dumps(entry) + "\n")
            logf.flush()

    try:
        for epoch in range(run["epoch"], cfg.epochs + 1):
            model.train()
            order.start(epoch, skip=run["batches_done"] if epoch == run["epoch"] else 0)
            t0, seen, loss_sum, loss_n, i = time.perf_counter(), 0, 0.0, 0, order.skip
            for i, batch in enumerate(loader, order.skip + 1):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = step_model(batch, generator=mining, validate=not validated)
                validated = True
                out.loss.backward()  # DDP averages the gradients over the processes
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                lr = cfg.lr * lr_multiplier(run["step"], schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                run["step"] += 1
                step = run["step"]
                seen += batch.num_samples or batch.num_pairs
                loss_sum += out.loss.detach().float()
                loss_n += 1
                if step % cfg.log_every == 0 or i == len(order):
                    loss = all_reduce_sum(torch.as_tensor(loss_sum / loss_n, device=device)
                                          .reshape(1), env).item() / world
                    entry = {"step": step, "epoch": epoch, "loss": loss, "lr": lr,
                             "examples_per_s": seen * world / (time.perf_counter() - t0)}
                    history.append(entry)
                    record(entry)
                    if not np.isfinite(loss):
                        raise FloatingPointError(f"finetune: the loss is {loss} at step {step}; "
                                                 f"try a lower --lr")
                    say(f"epoch {epoch} step {step}: loss {loss:.4f}, "
                        f"{entry['examples_per_s']:.1f} examples/s")
                    loss_sum, loss_n = 0.0, 0
                    t0, seen = time.perf_counter(), 0
                stopping = cfg.stop_at_step == step
                if (step % cfg.save_every == 0 or stopping) and i < len(order):
                    checkpoint(epoch, i)
                if stopping:
                    break
            if stopping and i < len(order):
                break
            if dev_files and main:  # scored by rank 0 alone; the others wait at the barrier
                score, scores = _score_dev(model, dev_files, resolver, cfg, device, amp)
                entry = {"epoch": epoch, "score": score, "files": scores}
                dev_scores.append(entry)
                record({"dev": entry})
                improved = score > run["best"]
                say(f"epoch {epoch} dev: {score:.2%}"
                    + (" (best so far, saved)" if improved else ""))
                if improved:
                    run.update(best=score, best_epoch=epoch)
                    model.save_pretrained(model_dir)
            barrier(env)
            checkpoint(epoch + 1, 0)
            if stopping:
                break
        if stopping:
            barrier(env)  # rank 0 has written the checkpoint before any process leaves
            say(f"stopped after step {run['step']} (--stop-at-step); --resume continues")
            return FinetuneResult(model, cfg.out, history, dev_scores, run["best_epoch"])
        if main and not dev_files:
            model.save_pretrained(model_dir)
    finally:
        if logf is not None:
            logf.close()
    barrier(env)
    best, best_epoch = run["best"], run["best_epoch"]
    say(f"saved {model_dir}" + (f" (epoch {best_epoch}, dev {best:.2%})" if dev_files else ""))
    if main and dev_files and best_epoch != cfg.epochs:
        model = UniGen.from_pretrained(model_dir).to(device)
    return FinetuneResult(model, cfg.out, history, dev_scores, best_epoch)


def parse_args(argv: list[str] | None = None) -> FinetuneConfig:
    d = FinetuneConfig(task="", model="", train=[], images="", out="")
    p = argparse.ArgumentParser(prog="python -m unigen.finetune",
                                description="Fine-tune UniGen on an IGLUE task.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", required=True, choices=IGLUE_TASKS)
    p.add_argument("--model", required=True, help="pre-trained model directory (save_pretrained)")
    p.add_argument("--train", required=True, nargs="+", help="IGLUE training file(s)")
    p.add_argument("--images", required=True, help="image root of the train and dev files")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--dev", nargs="+", default=[],
                   help="dev file(s): score every epoch, keep the best")
    helps = {"epochs": "passes over the training files (with --resume: the total, may grow)",
             "batch_size": "examples per step (per process under torchrun)",
             "save_every": "steps between checkpoints (<out>/checkpoint.pt; also after each epoch)",
             "stop_at_step": "checkpoint and stop after this step, e.g. to fit a job's time "
                             "slot (0: run to the end); --resume continues",
             "workers": "DataLoader processes decoding images", "seed": "shuffling, mining",
             "log_every": "steps between loss lines", "max_new_tokens": "dev: answer length",
             "num_beams": "dev: beam search width (1 = greedy)",
             "k": "dev (retrieval): contrastive candidates re-ranked by [match]",
             "lr": "AdamW peak learning rate", "weight_decay": "on matrices only",
             "warmup_steps": "linear warm-up steps", "min_lr_ratio": "lr at the last step / lr "
             "(linear, cosine)",
             "grad_clip": "max gradient norm (0: none)"}
    for name, kind in [(n, int) for n in ("epochs", "batch_size", "workers", "seed", "log_every",
                                          "max_new_tokens", "num_beams", "k", "save_every",
                                          "stop_at_step", "warmup_steps")] + \
                      [(n, float) for n in ("lr", "weight_decay", "grad_clip", "min_lr_ratio")]:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=helps[name])
    p.add_argument("--betas", type=float, nargs=2, default=list(d.betas), help="AdamW betas")
    p.add_argument("--decode", default=d.decode, choices=("generate", "rank"),
                   help="dev: generate answers (the paper), or rank the keywords (xvnli, marvl)")
    p.add_argument("--decay", default=d.decay, choices=("constant", "linear", "cosine"),
                   help="lr after warm-up (the paper: constant)")
    p.add_argument("--device", default=d.device, help="auto = cuda when available")
    p.add_argument("--precision", default=d.precision, choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 autocast on cuda, fp32 elsewhere")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from <out>/checkpoint.pt (same data, batch "
                        "size and seed: the same batches in the same order)")
    a = p.parse_args(argv)
    return FinetuneConfig(**{k: (tuple(v) if k == "betas" else v) for k, v in vars(a).items()})


def main(argv: list[str] | None = None) -> int:
    try:
        finetune(parse_args(argv))
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
