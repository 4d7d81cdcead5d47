"""IGLUE's zero-shot and few-shot protocol in one command (paper §4.3.2, Table 1):

    python -m unigen.iglue.fewshot --task xvnli --model ckpt/ --iglue iglue/datasets \\
        --images flickr30k-images/ --out runs/iglue [--languages ar es] [--shots 1 48]

1. the zero-shot fine-tune on the task's English files (:data:`~unigen.iglue.protocol.PROTOCOLS`),
2. its score on every target language's test file,
3. for every few-shot language and shot that IGLUE ships, a continuation of the zero-shot model
   on ``train_<N>`` and its score on that language's (few-shot) test file.

Every cell writes its result on completion and is never rerun: rerunning the command after an
interruption continues where it stopped (an interrupted fine-tune resumes from its last
checkpoint). A few-shot continuation keeps its last epoch (it has no dev file). A retrieval
few-shot file with fewer than two captioned images cannot train (no in-batch negative); that
cell is recorded as not run, with the reason. Layout below
``--out``: ``runs/<task>/zero_shot``, ``runs/<task>/few_shot/<lang>/<shot>`` (fine-tuning runs)
and ``results/<task>/zero_shot/<lang>.json``, ``results/<task>/few_shot/<shot>/<lang>.json``
(``python -m unigen.evaluate``'s JSON), which ``python -m unigen.iglue.table`` renders as
Table 1. MaRVL trains on NLVR2's images (``--images``) and is tested on MaRVL's release
(``--target-images``); xFlickr&CO's test images are Flickr30k's and COCO's below one root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Literal

from unigen.configuration import check_choices, check_int, check_number, run_cli
from unigen.training.config import (
    CheckpointConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)

from .config import (
    EvaluateConfig,
    FinetuneConfig,
    FinetuneDataConfig,
    ScoringConfig,
    check_pair_images,
)
from .evaluate import run_evaluation
from .finetune import MODEL_DIR, finetune
from .protocol import PROTOCOLS
from .readers import RETRIEVAL_TASKS, check_task, read_iglue


@dataclass(kw_only=True)
class FewshotConfig:
    """One task's zero-shot fine-tune, its test scores and its few-shot continuations."""

    task: str
    """The IGLUE task: xvnli, xgqa, marvl, xflickrco or wit (no few-shot files)."""
    model: str
    """The pre-trained model directory (``UniGen.save_pretrained``)."""
    iglue: str
    """IGLUE's ``datasets/`` folder (the public repository's layout)."""
    images: str
    """Image root of the English training and dev files."""
    target_images: str = ""
    """Image root of the target-language files (test and few-shot training); "" = ``images``.
    MaRVL: the MaRVL release (``<root>/<language>/images/<concept>/``)."""
    image_features: str = ""
    """A feature store of ``images`` (``python -m unigen.data.prepare image-features`` on a
    fine-tuning config whose ``data.images`` is that folder): the zero-shot fine-tune reads the
    stored ViT outputs instead of the images. "" = the images."""
    target_image_features: str = ""
    """A feature store of ``target_images``, for the few-shot fine-tunes; "" = ``image_features``
    where the target images are ``images``, else the images. Scoring always reads the images."""
    out: str = "runs/iglue"
    """Runs and results folder (shared by the tasks)."""
    languages: tuple[str, ...] = ()
    """Target languages; () = all of the task's."""
    shots: tuple[str, ...] = ()
    """Few-shot sizes (the N of train_<N>); () = all IGLUE ships for the task."""
    few_shot: bool = True
    """Run the few-shot continuations after the zero-shot cells."""
    dev: bool = True
    """Score the English dev file after every zero-shot epoch and keep the best epoch."""
    trainable: Literal["all", "decoder"] = "all"
    """What fine-tuning trains (:class:`~unigen.iglue.config.FinetuneConfig`)."""
    pair_images: Literal["side_by_side", "two_prefixes"] = "side_by_side"
    """MaRVL's two images, in fine-tuning and scoring alike (:class:`FinetuneConfig`)."""
    epochs: int = 10
    """Zero-shot fine-tuning epochs (the paper: 10)."""
    few_shot_epochs: int = 10
    """Few-shot continuation epochs."""
    lr: float = 3e-5
    """Learning rate of both (the paper: 3e-5)."""
    batch_size: int = 32
    """Training examples per step."""
    workers: int = 2
    """DataLoader processes decoding images."""
    device: str = "auto"
    """"auto", "cuda" or "cpu"."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """"auto" = bf16 autocast on CUDA."""
    seed: int = 0
    """Seed of every fine-tune."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Dev and test scoring."""

    def __post_init__(self):
        check_task(self.task, "fewshot")
        check_choices(self, "fewshot")
        for store in ("image_features", "target_image_features"):
            check_pair_images(self.task, self.pair_images, "fewshot",
                              store if getattr(self, store) else "")
        if self.target_image_features and not self.target_images:
            raise ValueError("fewshot: target_image_features is a store of target_images, which "
                             "is not set (the few-shot fine-tunes read images, so "
                             "image_features serves them)")
        self.languages, self.shots = tuple(self.languages), tuple(self.shots)
        protocol = PROTOCOLS[self.task]
        unknown = [lang for lang in self.languages if lang not in protocol.languages]
        if unknown:
            raise ValueError(f"fewshot: {self.task} has no language {unknown}; IGLUE's are "
                             f"{list(protocol.languages)}")
        bad = [s for s in self.shots if s not in protocol.shots]
        if bad:
            raise ValueError(f"fewshot: {self.task} ships no train_<N> for N in {bad}; IGLUE's "
                             f"are {list(protocol.shots) or 'none'}")
        for name in ("epochs", "few_shot_epochs", "batch_size"):
            check_int("fewshot", name, getattr(self, name))
        check_int("fewshot", "workers", self.workers, low=0)
        check_number("fewshot", "lr", self.lr, low=0.0)
        for name in ("model", "iglue", "images"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"fewshot: {name} must name a directory")


@dataclass
class Cell:
    """One fine-tune (or none, for a zero-shot test) and one test file's score."""

    setting: str  # "zero_shot" or "few_shot"
    lang: str
    shot: str | None
    train: str | None  # few-shot training file
    test: str

    @property
    def name(self) -> str:
        return f"{self.setting} {self.lang}" + (f" {self.shot}-shot" if self.shot else "")


def plan(cfg: FewshotConfig) -> tuple[list[Cell], list[str]]:
    """The cells of ``cfg`` and the protocol files they need."""
    p = PROTOCOLS[cfg.task]
    langs = cfg.languages or p.languages
    cells = [Cell("zero_shot", lang, None, None, p.test_file(lang)) for lang in langs]
    if cfg.few_shot and p.few_shot_train:
        for lang in (lang for lang in langs if lang in p.few_shot_languages):
            for shot in cfg.shots or p.shots:
                cells.append(Cell("few_shot", lang, shot, p.train_file(lang, shot),
                                  p.test_file(lang, few_shot=True)))
    needed = [p.train] + ([p.dev] if cfg.dev else [])
    needed += [c.test for c in cells] + [c.train for c in cells if c.train]
    return cells, list(dict.fromkeys(needed))


def _json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
    os.replace(tmp, path)  # a cell is finished exactly when its file exists


class FewshotRunner:
    def __init__(self, cfg: FewshotConfig, log=print):
        self.cfg, self.log = cfg, log
        self.p = PROTOCOLS[cfg.task]
        self.cells, needed = plan(cfg)
        missing = [f for f in needed if not os.path.isfile(self.data(f))]
        if missing:
            zipped = [f for f in missing if os.path.isfile(self.data(f) + ".zip")]
            raise FileNotFoundError(
                f"fewshot: {len(missing)} file(s) of IGLUE's {cfg.task} protocol are not below "
                f"{cfg.iglue!r}: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                + (f"; IGLUE ships {zipped[:3]} zipped: unzip them in place" if zipped else ""))
        self.runs = os.path.join(cfg.out, "runs", cfg.task)
        self.results = os.path.join(cfg.out, "results", cfg.task)

    def data(self, rel: str) -> str:
        return os.path.join(self.cfg.iglue, rel)

    def result_file(self, cell: Cell) -> str:
        if cell.setting == "zero_shot":
            return os.path.join(self.results, "zero_shot", f"{cell.lang}.json")
        return os.path.join(self.results, "few_shot", cell.shot, f"{cell.lang}.json")

    # ---- fine-tuning ----------------------------------------------------------------------
    def _finetune(self, out: str, model: str, train: str, dev: str | None, images: str,
                  features: str, epochs: int) -> str:
        """``out``'s fine-tuned model: reused when there, resumed when interrupted."""
        model_dir = os.path.join(out, MODEL_DIR)
        if os.path.isfile(os.path.join(model_dir, "config.json")):
            self.log(f"[fewshot] {out}: fine-tuned already, reused")
            return model_dir
        resume = "auto" if os.path.isdir(os.path.join(out, "checkpoints")) else "never"
        c = self.cfg
        ft = FinetuneConfig(
            task=c.task, model=model, trainable=c.trainable, pair_images=c.pair_images,
            data=FinetuneDataConfig(train=(train,), dev=(dev,) if dev else (), images=images,
                                    image_features=features, batch_size=c.batch_size,
                                    workers=c.workers),
            scoring=c.scoring,
            optim=OptimConfig(lr=c.lr, weight_decay=0.01),
            schedule=ScheduleConfig(steps=0, epochs=epochs, warmup_steps=0, decay="constant"),
            run=RunConfig(output_dir=out, device=c.device, precision=c.precision, seed=c.seed),
            checkpoint=CheckpointConfig(every=1000, keep_last=1, resume=resume),
            logging=LoggingConfig(every=50))
        self.log(f"[fewshot] fine-tuning {os.path.basename(train)} → {out}"
                 + (f" from the feature store {features}" if features else "")
                 + (" (resuming)" if resume == "auto" else ""))
        finetune(ft, log=self.log)
        return model_dir

    def zero_shot_model(self) -> str:
        c = self.cfg
        return self._finetune(os.path.join(self.runs, "zero_shot"), c.model,
                              self.data(self.p.train), self.data(self.p.dev) if c.dev else None,
                              c.images, c.image_features, c.epochs)

    # ---- one cell -------------------------------------------------------------------------
    def run_cell(self, cell: Cell, zero_shot_model: str) -> None:
        c = self.cfg
        target_images = c.target_images or c.images
        model = zero_shot_model
        if cell.setting == "few_shot":
            train = self.data(cell.train)
            if c.task in RETRIEVAL_TASKS:
                images = sum(any(t.strip() for t in r.texts)
                             for r in read_iglue(c.task, train).records)
                if images < 2:
                    reason = (f"{cell.train} holds {images} captioned image(s); retrieval "
                              f"fine-tuning needs at least 2 (an in-batch negative)")
                    self.log(f"[fewshot] {cell.name}: not run: {reason}")
                    _write_json(self.result_file(cell), {
                        "task": c.task, "setting": cell.setting, "language": cell.lang,
                        "shot": cell.shot, "not_run": reason})
                    return
            features = c.target_image_features if c.target_images else c.image_features
            model = self._finetune(os.path.join(self.runs, "few_shot", cell.lang, cell.shot),
                                   zero_shot_model, train, None, target_images, features,
                                   c.few_shot_epochs)
        ev = EvaluateConfig(task=c.task, model=model, tests=(f"{cell.lang}={self.data(cell.test)}",),
                            images=target_images, device=c.device, precision=c.precision,
                            pair_images=c.pair_images, scoring=c.scoring)
        results = run_evaluation(ev, log=self.log)
        _write_json(self.result_file(cell), {
            "task": c.task, "setting": cell.setting, "language": cell.lang, "shot": cell.shot,
            "test": cell.test, "train": cell.train, "model": model,
            "metrics": results[cell.lang]})

    def run(self) -> dict:
        todo = [cell for cell in self.cells if not os.path.isfile(self.result_file(cell))]
        self.log(f"[fewshot] {self.cfg.task}: {len(self.cells)} cells, "
                 f"{len(self.cells) - len(todo)} done already, {len(todo)} to run; results in "
                 f"{self.cfg.out}")
        if todo:
            zero_shot_model = self.zero_shot_model()
            for i, cell in enumerate(todo, 1):
                self.log(f"[fewshot] cell {i}/{len(todo)}: {cell.name}")
                self.run_cell(cell, zero_shot_model)
        return {cell.name: _json(self.result_file(cell)) for cell in self.cells}


def run_fewshot(cfg: FewshotConfig, *, log=print) -> dict:
    """Every cell of ``cfg`` (module docstring): {cell name: its result JSON}."""
    return FewshotRunner(cfg, log=log).run()


def main(argv: list[str] | None = None) -> int:
    return run_cli(FewshotConfig, run_fewshot, argv, prog="python -m unigen.iglue.fewshot",
                   description=__doc__,
                   errors=(ValueError, FileNotFoundError, FileExistsError, FloatingPointError))


if __name__ == "__main__":
    import sys

    sys.exit(main())
