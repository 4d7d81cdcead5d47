"""The configs of ``python -m unigen.finetune`` and ``python -m unigen.evaluate``.

Both read ``--config FILE.yaml`` plus ``--section.key=value`` overrides through the one loader
(:mod:`unigen.configuration`), like pre-training. The command lines of earlier releases keep
working: each old flag is an alias of a key (``--lr`` is ``--optim.lr``, ``--train a b`` is
``--data.train a b``, ``--resume`` is ``--checkpoint.resume=auto``; ``--help`` lists them).

Fine-tuning's defaults are the paper's (§4.2): AdamW (β = 0.9, 0.98), learning rate 3e-5 held
constant without warm-up, 10 epochs, bf16 autocast on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from unigen.configuration import Flag, check_choices, check_int
from unigen.training.config import (
    CheckpointConfig,
    DistributedConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)

from .readers import check_task

DECODES = ("generate", "rank")
# The tasks whose answers are a closed set of keywords (decode="rank" ranks them).
KEYWORD_TASKS = ("xvnli", "marvl")
TRAINABLE = ("all", "decoder")


def check_pair_images(task: str, pair_images: str, op: str, store: str = "") -> None:
    """``store``: the option naming a feature store, when one is given."""
    if pair_images == "two_prefixes" and task != "marvl":
        raise ValueError(f"{op}: pair_images=two_prefixes is for marvl (two images per "
                         f"statement), not {task}")
    if store and task == "marvl" and pair_images == "side_by_side":
        raise ValueError(f"{op}: {store} cannot honour pair_images=side_by_side (MaRVL's two "
                         f"images pasted into one before the ViT; a store holds single images): "
                         f"set pair_images=two_prefixes")


def check_decode(task: str, decode: str, op: str, answers: str = "") -> None:
    if decode not in DECODES:
        raise ValueError(f"{op}: decode must be one of {DECODES}, got {decode!r}")
    if answers and task != "xgqa":
        raise ValueError(f"{op}: scoring.answers (a closed answer set) is for xgqa, not {task}")
    if answers and decode != "rank":
        raise ValueError(f"{op}: scoring.answers ranks the closed answer set; it needs "
                         f"scoring.decode=rank (--decode rank)")
    if decode == "rank" and task not in KEYWORD_TASKS and not (task == "xgqa" and answers):
        raise ValueError(f"{op}: decode='rank' needs a closed set of answers; {task} answers "
                         f"are generated (xvnli and marvl have keywords; xgqa takes IGLUE's "
                         f"label→answer JSON as scoring.answers)")


@dataclass(kw_only=True)
class ScoringConfig:
    """How a model is scored on IGLUE files: dev files after every fine-tuning epoch, test files
    in ``python -m unigen.evaluate``."""

    batch_size: int = 64
    """Examples per generation / encoding call (the scores do not depend on it)."""
    workers: int = 2
    """DataLoader processes decoding images."""
    decode: Literal["generate", "rank"] = "generate"
    """"generate" answers (the paper's protocol), or "rank" a closed set: the keywords (xvnli,
    marvl) or, for xgqa, the answers of ``answers``; the candidate of highest log-probability,
    never off-label."""
    answers: str = ""
    """xgqa with decode=rank: IGLUE's closed answer set, a label→answer JSON
    (``gqa/annotations/trainval_label2ans.json``)."""
    max_new_tokens: int = 8
    """Longest generated answer."""
    num_beams: int = 1
    """Beam search width (1 = greedy)."""
    k: int = 16
    """Retrieval: contrastive candidates re-ranked by [match]."""

    def __post_init__(self):
        check_choices(self, "scoring")
        for name in ("batch_size", "max_new_tokens", "num_beams", "k"):
            check_int("scoring", name, getattr(self, name))
        check_int("scoring", "workers", self.workers, low=0)


@dataclass(kw_only=True)
class FinetuneDataConfig:
    """The task's files and how they are batched."""

    train: tuple[str, ...]
    """IGLUE training file(s) of the task."""
    images: str
    """Image root of the train and dev files."""
    dev: tuple[str, ...] = ()
    """Dev file(s): scored after every epoch; ``<output_dir>/model`` keeps the best epoch."""
    batch_size: int = 32
    """Examples per step, per process under torchrun (each global batch is ``batch_size ×
    processes``)."""
    workers: int = 2
    """DataLoader processes decoding images."""
    image_features: str = ""
    """A feature store of ``images`` (``python -m unigen.data.prepare image-features`` on this
    config): training reads each image's stored ViT output instead of decoding it and running
    the ViT (dev scoring still reads the images). Empty: decode the images."""

    def __post_init__(self):
        self.train, self.dev = tuple(self.train), tuple(self.dev)
        if not self.train:
            raise ValueError("finetune: data.train names no file")
        check_int("data", "batch_size", self.batch_size)
        check_int("data", "workers", self.workers, low=0)


@dataclass(kw_only=True)
class FinetuneConfig:
    """Everything one fine-tuning run needs (``python -m unigen.finetune``)."""

    task: str
    """The IGLUE task: xvnli, xgqa, marvl, xflickrco or wit."""
    model: str
    """The pre-trained model: a directory written by ``UniGen.save_pretrained`` (with its
    tokenizers)."""
    trainable: Literal["all", "decoder"] = "all"
    """"all": every part the pre-training trained (the middle decoder layers and the ViT stay
    frozen); "decoder": the decoder alone (§4.2, "fine-tune the decoder"; for retrieval only
    [match] then learns, L_CL's encoders and projections stay as pre-trained)."""
    pair_images: Literal["side_by_side", "two_prefixes"] = "side_by_side"
    """MaRVL/NLVR2's two images: "side_by_side", one image left | right (one 32-query prefix,
    the layout pre-training taught the decoder), or "two_prefixes", E_v(left) ⊕ E_v(right),
    each image at full resolution (twice the prefix). Score with the same choice."""
    data: FinetuneDataConfig
    """Training and dev files."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Dev scoring."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, weight_decay=0.01))
    """AdamW (the paper's fine-tuning lr: 3e-5)."""
    schedule: ScheduleConfig = field(default_factory=lambda: ScheduleConfig(
        steps=0, epochs=10, warmup_steps=0, decay="constant"))
    """10 epochs at a constant learning rate (the paper); ``decay`` linear/cosine and
    ``warmup_steps`` give pre-training's schedule instead."""
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/finetune"))
    """Run folder (must not hold a fine-tuned model yet, unless resuming), seed, device."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(
        every=1000, keep_last=1, resume="never"))
    """Checkpoints every ``every`` steps and after every epoch; ``resume: auto`` (``--resume``)
    continues an interrupted run on the same batches, and a larger ``schedule.epochs`` extends
    a finished one."""
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(every=50))
    """Loss lines every ``every`` steps and at each epoch's end."""
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Under torchrun: DDP (rank 0 scores the dev files alone, so FSDP is not offered)."""

    def __post_init__(self):
        check_task(self.task, "finetune")
        check_choices(self, "finetune")
        check_decode(self.task, self.scoring.decode, "finetune", self.scoring.answers)
        check_pair_images(self.task, self.pair_images, "finetune",
                          "data.image_features" if self.data.image_features else "")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("finetune: model must name a pre-trained model directory")
        if self.distributed.parallelism != "ddp":
            raise ValueError("finetune: distributed.parallelism must be 'ddp' (rank 0 scores "
                             "the dev files on its own copy of the model)")


# The flags of the earlier fine-tuning command line, as aliases of the config keys.
FINETUNE_FLAGS = {
    "train": "data.train", "dev": "data.dev", "images": "data.images",
    "batch_size": "data.batch_size", "workers": "data.workers", "out": "run.output_dir",
    "epochs": "schedule.epochs", "decay": "schedule.decay",
    "warmup_steps": "schedule.warmup_steps", "min_lr_ratio": "schedule.min_lr_ratio",
    "lr": "optim.lr", "betas": "optim.betas", "weight_decay": "optim.weight_decay",
    "grad_clip": "optim.grad_clip", "device": "run.device", "precision": "run.precision",
    "seed": "run.seed", "stop_at_step": "run.stop_at_step", "log_every": "logging.every",
    "save_every": "checkpoint.every", "resume": Flag("checkpoint.resume", const="auto"),
    "accept_changes": "checkpoint.accept_changes",
    "max_new_tokens": "scoring.max_new_tokens", "num_beams": "scoring.num_beams",
    "k": "scoring.k", "decode": "scoring.decode", "answers": "scoring.answers",
}


@dataclass(kw_only=True)
class EvaluateConfig:
    """Everything one scoring run needs (``python -m unigen.evaluate``)."""

    task: str
    """The IGLUE task: xvnli, xgqa, marvl, xflickrco or wit."""
    model: str
    """The model directory (``UniGen.save_pretrained``)."""
    tests: tuple[str, ...]
    """Test files, each ``NAME=FILE`` or a bare ``FILE`` (named by its path)."""
    images: str
    """Image root of the test files."""
    out: str = ""
    """Write every metric (and this config) as JSON here."""
    predictions: str = ""
    """Directory for ``<NAME>.jsonl`` per test file: the generated answers, or for retrieval
    every caption's ranked images and every image's ranked captions."""
    device: str = "auto"
    """"auto" = cuda when available; or a torch device ("cpu", "cuda:1")."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """"auto" = bf16 autocast on CUDA, fp32 elsewhere."""
    pair_images: Literal["side_by_side", "two_prefixes"] = "side_by_side"
    """MaRVL's two images as fine-tuned (:class:`FinetuneConfig`)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Batching and decoding."""

    def __post_init__(self):
        check_task(self.task, "evaluate")
        check_choices(self, "evaluate")
        check_decode(self.task, self.scoring.decode, "evaluate", self.scoring.answers)
        check_pair_images(self.task, self.pair_images, "evaluate")
        self.tests = tuple(self.tests)
        if not self.tests:
            raise ValueError("evaluate: no --test file")
        names = [name for name, _ in self.named_tests()]
        if len(set(names)) != len(names):
            raise ValueError(f"evaluate: test names must differ, got {names}")

    def named_tests(self) -> list[tuple[str, str]]:
        out = []
        for spec in self.tests:
            name, sep, path = spec.partition("=")
            if not sep:
                out.append((spec, spec))
            elif not name or not path:
                raise ValueError(f"evaluate: --test entries are NAME=FILE or FILE, got {spec!r}")
            else:
                out.append((name, path))
        return out

    def predictions_file(self, name: str) -> str:
        """``<predictions>/<NAME>.jsonl``; a bare path names the file with its folders joined
        by "_" (IGLUE calls every language's file test.jsonl)."""
        safe = name.replace("\\", "/").strip("/").replace("/", "_")
        return os.path.join(self.predictions, f"{safe}.jsonl")


EVALUATE_FLAGS = {
    "test": "tests", "batch_size": "scoring.batch_size", "workers": "scoring.workers",
    "max_new_tokens": "scoring.max_new_tokens", "num_beams": "scoring.num_beams",
    "k": "scoring.k", "decode": "scoring.decode", "answers": "scoring.answers",
}
