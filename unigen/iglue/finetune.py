"""Fine-tuning a pre-trained UniGen on an IGLUE task (paper §4.2 "fine-tuning phase", §4.3):
a recipe on the training core (:mod:`unigen.training`).

    python -m unigen.finetune --task xvnli --model ckpt/ --train XVNLI/annotations/en/train.jsonl \\
        --images flickr30k-images/ --out runs/xvnli-en [--dev .../en/dev.jsonl] [--epochs 10]
    python -m unigen.finetune --config finetune.yaml [--section.key=value ...]

The tasks keep UniGen's single generative objective: XVNLI, xGQA and MaRVL/NLVR2 are [qus]
samples (image ⊕ encoder text ⊕ [qus] → the keyword or the answer, the same fused
cross-entropy as pre-training); xFlickr&CO and WIT train the retrieval heads, L_CL with mined
hard negatives and the [match] task built from them, one pair per caption (an empty caption
has nothing to learn from: it is left out of training and counted in the log; file formats:
:mod:`unigen.iglue.readers`). ``trainable: decoder`` fine-tunes the decoder alone (§4.2);
``all`` (the default) every part pre-training trained. Every image is resolved before the
model is built (:mod:`unigen.iglue.images`).
Zero-shot transfer fine-tunes on the English files and evaluates on the others
(``python -m unigen.evaluate``); few-shot continues from that model on a target language's
``train_<n>`` file. Config and defaults: :mod:`unigen.iglue.config`.

With dev files the model is scored after every epoch and ``<output_dir>/model`` keeps the best
epoch (mean of the dev files' headline metric); without, it is the last epoch's. The run
folder is pre-training's: ``config.yaml``, ``metrics.jsonl`` (loss lines, and one ``"dev"`` line
per epoch), ``checkpoints/step_<N>`` (every ``checkpoint.every`` steps and after each epoch).
``--resume`` (``checkpoint.resume=auto``) continues an interrupted run on the same batches in
the same order (each epoch's order is drawn from the seed and the epoch alone), and a larger
``--epochs`` with ``--accept-changes schedule.epochs`` extends a finished one.

Under ``torchrun --nproc_per_node N -m unigen.finetune ...`` (the paper fine-tuned retrieval on
8 GPUs) each process takes one GPU and ``data.batch_size`` examples of every global batch of
``batch_size × N``; DDP averages the gradients, L_CL's features are gathered over all
processes (negatives from the global batch), and rank 0 logs, scores the dev files and writes.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from unigen.configuration import config_from_argv, run_cli
from unigen.data.examples import Example, collate_examples
from unigen.data.feature_store import FeatureStore, FeatureStoreError, check_store_vit
from unigen.training.distributed import barrier, init_distributed, teardown_distributed
from unigen.training.recipe import Recipe, StepOutput
from unigen.training.trainer import Trainer

from .config import FINETUNE_FLAGS, FinetuneConfig
from .images import ImageResolver
from .readers import RETRIEVAL_TASKS, IGLUERecord, read_answer_set, read_iglue
from .scoring import evaluate_file, headline

MODEL_DIR = "model"
# What "trainable: decoder" leaves frozen besides what pre-training froze (§4.2).
_ENCODER_PARTS = ("image_encoder", "text_encoder", "image_proj", "text_proj", "logit_scale")


@dataclass
class FinetuneResult:
    model: object
    """The UniGen of ``<output_dir>/model`` (best dev epoch, or last), on the training device."""
    out: str
    """The run folder."""
    history: dict[str, list]
    """Per step: ``step``, ``loss``, ``lr``, ``grad_norm`` (the training core's history)."""
    dev: list[dict]
    """Per epoch: ``{"epoch", "score", "files": {path: metrics}}``."""
    best_epoch: int | None
    step: int = 0
    """Optimizer steps completed."""


class _Examples(torch.utils.data.Dataset):
    """Records as collate-ready :class:`Example` s: one per record, or one per non-empty caption
    for retrieval (each caption pairs with its image; an image's captions are positives).
    ``files`` are the records' resolved image files."""

    def __init__(self, task: str, records: list[IGLUERecord], files: list[tuple[str, ...]],
                 resolver: ImageResolver, size: int, pair_images: str = "side_by_side",
                 feature_store: FeatureStore | None = None):
        self.task, self.records, self.files = task, records, files
        self.two_prefixes = pair_images == "two_prefixes"
        self.resolver, self.size = resolver, size
        self.feature_store = feature_store
        self.retrieval = task in RETRIEVAL_TASKS
        self.items = [(r, t) for r, rec in enumerate(records)
                      for t in (range(len(rec.texts)) if self.retrieval else (0,))
                      if not self.retrieval or rec.texts[t].strip()]

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, files: tuple[str, ...]):
        """The image of ``files`` (side by side): uint8 pixels, or its stored ViT features
        (one file: a store holds single images)."""
        if self.feature_store is None:
            return self.resolver.files_tensor(files, self.size)
        return self.feature_store.lookup(store_key(self.resolver, files[0]))

    def __getitem__(self, i: int) -> Example:
        r, t = self.items[i]
        rec = self.records[r]
        files = self.files[r]
        if self.two_prefixes and len(files) == 2:  # E_v(left) ⊕ E_v(right)
            left, right = (self._image((f,)) for f in files)
            return Example("qus", target=rec.answer, image=left, text=rec.texts[0],
                           image_id=files[0], second_image=right, second_image_id=files[1])
        image = self._image(files)
        if self.retrieval:
            return Example(None, image=image, image_id=rec.images, pair_text=rec.texts[t])
        return Example("qus", target=rec.answer, image=image, text=rec.texts[0],
                       image_id=rec.images)


def store_key(resolver: ImageResolver, path: str) -> str:
    """An image's key in a feature store of the image folder: its path below the root."""
    return os.path.relpath(path, resolver.root)


def _open_feature_store(cfg: FinetuneConfig, resolver: ImageResolver,
                        train_images: list[tuple[str, ...]]) -> FeatureStore:
    """``data.image_features`` opened, holding every training image (an image its extraction
    could not decode stops the run naming it, as it does from pixels)."""
    store = FeatureStore(cfg.data.image_features)
    keys = sorted({store_key(resolver, f) for files in train_images for f in files})
    missing = [k for k in keys if k not in store]
    if missing:
        raise FeatureStoreError(
            f"data.image_features: the store {store.directory!r} has no features of "
            f"{len(missing)} of the {len(keys)} training images (e.g. {missing[0]!r} below "
            f"data.images): it was made from another image folder or is unfinished; rerun "
            f"python -m unigen.data.prepare image-features on this config (it resumes)")
    bad = [k for k in keys if k in store.undecodable]
    if bad:
        raise ValueError(f"image {store.undecodable[bad[0]]!r} cannot be decoded (its feature "
                         f"extraction found so{f', and {len(bad) - 1} more' if len(bad) > 1 else ''})")
    return store


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


class FinetuneRecipe(Recipe):
    name = "unigen.finetune"
    resume_hint = "--resume (checkpoint.resume=auto) continues"
    # What an interrupted run and its resumption must share: the batches follow them (other
    # keys that change the run, such as a longer --epochs, resume with --accept-changes).
    resume_fixed_keys = ("task", "model", "trainable", "pair_images", "data.train", "data.dev",
                         "data.images", "data.batch_size", "run.seed")

    def __init__(self, cfg: FinetuneConfig):
        if not isinstance(cfg, FinetuneConfig):
            raise TypeError(f"finetune: config must be a FinetuneConfig, got "
                            f"{type(cfg).__name__}")
        self.cfg = cfg
        self.model_dir = os.path.join(cfg.run.output_dir, MODEL_DIR)
        if cfg.checkpoint.resume == "never" and os.path.exists(
                os.path.join(self.model_dir, "config.json")):
            raise FileExistsError(f"finetune: {cfg.run.output_dir!r} already holds a fine-tuned "
                                  f"model; choose another --out (run.output_dir), or --resume an "
                                  f"interrupted run")
        # all formats checked before any work
        self.resolver = ImageResolver(cfg.data.images)
        self.train_files = [read_iglue(cfg.task, p) for p in cfg.data.train]
        self.dev_files = [read_iglue(cfg.task, p) for p in cfg.data.dev]
        self.train_images = [f for tf in self.train_files
                             for f in self.resolver.check(tf.path, tf.records)]
        for f in self.dev_files:
            self.resolver.check(f.path, f.records)
        self.feature_store = (_open_feature_store(cfg, self.resolver, self.train_images)
                              if cfg.data.image_features else None)
        self.answer_set = read_answer_set(cfg.scoring.answers) if cfg.scoring.answers else None
        self.run = {"dev": [], "best": -1.0, "best_epoch": None}
        self.best_model = None

    def setup(self, trainer) -> None:
        super().setup(trainer)
        for what, files in (("train", self.train_files), ("dev", self.dev_files)):
            for f in files:
                trainer.log(f"{what} {f.path}: {len(f.records)} records"
                            + (f" ({f.skipped} skipped: no usable label)" if f.skipped else "")
                            + (f" ({f.empty_texts} empty captions"
                               + (", not trained on)" if what == "train" else ", kept as queries)")
                               if f.empty_texts else ""))

    def build_model(self):
        from unigen.model.unigen_model import UniGen

        cfg, world = self.cfg, self.env.world_size
        model = UniGen.from_pretrained(cfg.model)
        if model.text_tokenizer is None or model.decoder_tokenizer is None:
            raise ValueError(f"finetune: {cfg.model!r} holds no tokenizers (save the model with "
                             f"them attached)")
        if cfg.trainable == "decoder":
            for part in _ENCODER_PARTS:
                getattr(model, part).requires_grad_(False)
        mc = model.config
        if self.feature_store is not None:
            v = mc.vision
            self.feature_store.check_preprocessing(
                image_size=v.image_size, interpolation="bicubic", random_resized_crop=None,
                mean=v.image_mean, std=v.image_std,
                names={"image_size": "the model's vision.image_size",
                       "interpolation": "fine-tuning's resize filter",
                       "random_resized_crop": "fine-tuning's crops (none)",
                       "mean": "the model's vision.image_mean",
                       "std": "the model's vision.image_std"})
            check_store_vit(self.feature_store, model, self.trainer.amp_dtype)
        records = [r for f in self.train_files for r in f.records]
        self.data = _Examples(cfg.task, records, self.train_images, self.resolver,
                              mc.vision.image_size, cfg.pair_images, self.feature_store)
        retrieval = cfg.task in RETRIEVAL_TASKS
        if retrieval and len({r for r, _ in self.data.items}) < 2:
            raise ValueError("finetune: retrieval needs captioned images of at least 2 images "
                             "(an in-batch negative); the training files hold fewer")
        if len(self.data) < max(world, 2 if retrieval else 1):
            raise ValueError(f"finetune: {len(self.data)} training examples are too few"
                             + (" for retrieval (at least 2 image-caption pairs)" if retrieval
                                else f" for {world} processes"))
        self.batch_size = min(cfg.data.batch_size, len(self.data) // world)
        self.collate = functools.partial(
            collate_examples, text_tokenizer=model.text_tokenizer,
            decoder_tokenizer=model.decoder_tokenizer, image_size=mc.vision.image_size,
            image_mean=mc.vision.image_mean, image_std=mc.vision.image_std,
            max_text_length=mc.text.max_length)
        if cfg.data.workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers fork-safety
        # A retrieval batch of one pair has no in-batch negative, and the processes must all
        # take the same number of steps: the last batch is dropped when it could be short.
        self.order = _BatchOrder(len(self.data), self.batch_size,
                                 drop_last=retrieval or world > 1, seed=cfg.run.seed,
                                 rank=self.env.rank, world=world)
        o, s = cfg.optim, cfg.schedule
        self.trainer.log(
            f"fine-tuning {cfg.task} on {len(self.data)} examples ({len(records)} records), "
            f"{len(self.order)} steps/epoch × {s.epochs} epochs, batch {self.batch_size}"
            + (f" per process × {world} processes" if world > 1 else "")
            + f", lr {o.lr} ({s.decay}"
            + (f", {s.warmup_steps} warm-up steps" if s.warmup_steps else "")
            + f"), {self.env.device.type}"
            + (" bf16" if self.trainer.amp_dtype is not None else "")
            + f", {model.num_parameters():,} trainable parameters ({cfg.trainable})")
        return model

    def micro_batches_per_epoch(self) -> int:
        return len(self.order)

    def micro_batch_size(self) -> int:
        return self.batch_size

    def every_parameter_used(self) -> bool:
        """Retrieval trains L_CL and [match] on every batch, which reach every trainable part;
        the [qus] tasks leave the contrastive projections and the temperature without a
        gradient (both checked step by step on the tiny model)."""
        return self.cfg.task in RETRIEVAL_TASKS

    def new_run_hint(self, checkpoint: str) -> str:
        return f"--model {os.path.join(checkpoint, 'model')} starts one from its weights"

    def batches(self, epoch: int, done: int):
        def epochs(epoch, done):
            while True:
                self.order.start(epoch, skip=done)
                # Its own generator: creating the loader does not draw from the global RNG,
                # so a resumed run's random state stays the uninterrupted run's.
                yield from torch.utils.data.DataLoader(
                    self.data, batch_sampler=self.order, collate_fn=self.collate,
                    num_workers=self.cfg.data.workers,
                    pin_memory=self.env.device.type == "cuda",
                    generator=torch.Generator().manual_seed(self.cfg.run.seed + epoch))
                epoch, done = epoch + 1, 0

        return epochs(epoch, done)

    def forward(self, model, batch, generator, validate: bool) -> StepOutput:
        out = model(batch, generator=generator, validate=validate)
        return StepOutput(out.loss, batch.num_samples or batch.num_pairs)

    # ---- dev scoring and best-epoch selection ---------------------------------------------
    def end_of_epoch(self, trainer, epoch: int) -> dict | None:
        if not self.dev_files:
            return None
        entry = None
        if trainer.env.is_main:  # scored by rank 0 alone; the others wait at the barrier
            score, scores = self._score_dev(trainer)
            entry = {"epoch": epoch, "score": score, "files": scores}
            self.run["dev"].append(entry)
            improved = score > self.run["best"]
            trainer.log(f"epoch {epoch} dev: {score:.2%}"
                        + (" (best so far, saved)" if improved else ""))
            if improved:
                self.run.update(best=score, best_epoch=epoch)
                if self.cfg.run.save_final_model:
                    trainer.model.save_pretrained(self.model_dir)
            trainer.model.train()
        barrier(trainer.env)
        return {"dev": entry} if entry is not None else None

    def _score_dev(self, trainer):
        """(mean headline metric, {path: metrics}) of the dev files."""
        sc, device = self.cfg.scoring, trainer.device
        scores = {}
        for f in self.dev_files:
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=trainer.amp_dtype is not None):
                scores[f.path], _ = evaluate_file(trainer.model, f, self.resolver,
                                                  batch_size=sc.batch_size,
                                                  max_new_tokens=sc.max_new_tokens,
                                                  num_beams=sc.num_beams, k=sc.k,
                                                  workers=sc.workers, decode=sc.decode,
                                                  answer_set=self.answer_set,
                                                  pair_images=self.cfg.pair_images,
                                                  log=trainer.log)
        return sum(headline(self.cfg.task, m) for m in scores.values()) / len(scores), scores

    def finish(self, trainer) -> str | None:
        if not self.cfg.run.save_final_model:
            return None
        if not self.dev_files:
            trainer.save_model(self.model_dir)
        best, best_epoch = self.run["best"], self.run["best_epoch"]
        trainer.log(f"saved {self.model_dir}"
                    + (f" (epoch {best_epoch}, dev {best:.2%})" if self.dev_files else ""))
        last_epoch = trainer.epoch_of(trainer.step)
        if trainer.env.is_main and self.dev_files and best_epoch != last_epoch:
            from unigen.model.unigen_model import UniGen

            self.best_model = UniGen.from_pretrained(self.model_dir).to(trainer.device)
        return self.model_dir

    # ---- resuming --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return dict(self.run)

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.run = dict(state)


def finetune(cfg: FinetuneConfig, *, log=None) -> FinetuneResult:
    """Fine-tune ``cfg.model`` on ``cfg.data.train``; write ``cfg.run.output_dir`` (module
    docstring). Under torchrun every process runs this; rank 0 logs, scores the dev files and
    writes. ``log`` receives rank 0's lines (default: printed)."""
    recipe = FinetuneRecipe(cfg)
    env = init_distributed(cfg.distributed, cfg.run)
    try:
        result = Trainer(recipe, cfg, env, log=log).fit()
    finally:
        teardown_distributed(env)
    model = recipe.best_model if recipe.best_model is not None else result.model
    return FinetuneResult(model, cfg.run.output_dir, result.history, recipe.run["dev"],
                          recipe.run["best_epoch"], result.step)


def parse_args(argv: list[str]) -> FinetuneConfig:
    """The command line (``--config FILE``, ``--section.key=value`` and the flag aliases of
    :data:`~unigen.iglue.config.FINETUNE_FLAGS`) → a :class:`FinetuneConfig`."""
    return config_from_argv(FinetuneConfig, argv, FINETUNE_FLAGS)


def main(argv: list[str] | None = None) -> int:
    return run_cli(FinetuneConfig, finetune, argv, prog="python -m unigen.finetune",
                   description=__doc__, aliases=FINETUNE_FLAGS,
                   errors=(ValueError, FileNotFoundError, FileExistsError, FloatingPointError))
