"""Evaluation on the held-out split of the synthetic world (unigen.data.synthetic_world):
per language, retrieval R@1 (contrastive and [match]-re-ranked) and QA accuracy.

    python -m unigen.scoring.world --model RUN/final_model --world WORLD_DIR [--k 8] [--out F.json]
"""

from __future__ import annotations

import json
import sys
import tarfile
from dataclasses import asdict, dataclass

import torch

from unigen.data.image_pipeline import ImageSpec, PilImageDecoder
from unigen.data.synthetic_world import WorldFiles

from .qa import qa_accuracy
from .retrieval import retrieval_recall_at_1


@dataclass
class EvalSplit:
    keys: list[str]
    images: torch.Tensor  # [N, 3, S, S], CLIP-normalised
    captions: dict[str, list[str]]  # language -> caption of every image
    qa: list[dict]  # {"key", "question" (English), "questions" {lang: question}, "answer"}


def load_eval_split(files: WorldFiles, image_size: int) -> EvalSplit:
    raw = {}
    for shard in files.eval_image_shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".jpg"):
                    raw[member.name[:-4]] = tar.extractfile(member).read()
    with open(files.eval_captions, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    keys = [r["key"] for r in rows]
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ValueError(f"eval captions name images missing from the eval shards: {missing[:5]}")
    images, ok = PilImageDecoder(ImageSpec(image_size)).decode([raw[k] for k in keys])
    if len(ok) != len(keys):
        raise ValueError("some held-out images could not be decoded")
    captions = {lang: [r["captions"][lang] for r in rows] for lang in rows[0]["captions"]}
    with open(files.eval_qa, encoding="utf-8") as f:
        qa = [json.loads(line) for line in f]
    return EvalSplit(keys, images, captions, qa)


@dataclass
class LanguageScores:
    language: str
    with_images_in_training: bool
    i2t_contrastive: float
    t2i_contrastive: float
    i2t_rerank: float
    t2i_rerank: float
    chance: float
    qa_accuracy: float | None


def evaluate_world(model, split: EvalSplit, files: WorldFiles, *, k: int = 8) -> list[LanguageScores]:
    """Scores for every language of the world (English first)."""
    model.eval()
    index = {key: i for i, key in enumerate(split.keys)}
    qa_images = split.images[[index[r["key"]] for r in split.qa]]
    answers = [r["answer"] for r in split.qa]
    out = []
    for lang in files.languages:
        r = retrieval_recall_at_1(model, split.images, split.captions[lang], k=k)
        questions = [r_["questions"][lang] if "questions" in r_ else (r_["question"] if lang == "en" else None)
                     for r_ in split.qa]
        qa = qa_accuracy(model, qa_images, questions, answers) if None not in questions else None
        out.append(LanguageScores(lang, lang == "en" or lang in files.image_languages,
                                  r.i2t_contrastive, r.t2i_contrastive, r.i2t_rerank, r.t2i_rerank,
                                  r.i2t_chance, qa))
    return out


def scores_to_dicts(scores: list[LanguageScores]) -> list[dict]:
    return [asdict(s) for s in scores]


@dataclass(kw_only=True)
class WorldEvalConfig:
    model: str
    """A ``save_pretrained`` directory with its tokenizers (e.g. a run's ``final_model``)."""
    world: str
    """The synthetic world's folder (the one holding ``world.json``)."""
    k: int = 8
    """[match] re-ranks the top ``k`` of the contrastive ranking."""
    out: str = ""
    """Also write the scores as JSON to this file."""


def _run(cfg: WorldEvalConfig) -> None:
    import os

    from unigen.model.unigen_model import UniGen

    if not os.path.isfile(os.path.join(cfg.world, "world.json")):
        raise FileNotFoundError(f"world: no world.json in {cfg.world!r} (write one with "
                                f"python -m unigen.data.synthetic_world)")
    files = WorldFiles.load(cfg.world)
    print(f"[unigen.scoring.world] {cfg.model} on the held-out split of {cfg.world} "
          f"({files.counts.get('eval_images', '?')} images, {len(files.languages)} languages; "
          f"[match] re-ranks the top {cfg.k}), on the CPU", flush=True)
    model = UniGen.from_pretrained(cfg.model)
    split = load_eval_split(files, model.config.vision.image_size)
    scores = evaluate_world(model, split, files, k=cfg.k)
    print(f"{len(split.keys)} held-out images; R@1 chance {scores[0].chance:.1%}")
    print("language | images in training | I→T R@1 | T→I R@1 | I→T re-ranked | T→I re-ranked | QA")
    for s in scores:
        qa = "-" if s.qa_accuracy is None else f"{s.qa_accuracy:.1%}"
        print(f"{s.language} | {'yes' if s.with_images_in_training else 'no'} | {s.i2t_contrastive:.1%} | "
              f"{s.t2i_contrastive:.1%} | {s.i2t_rerank:.1%} | {s.t2i_rerank:.1%} | {qa}")
    if cfg.out:
        with open(cfg.out, "w", encoding="utf-8") as f:
            json.dump(scores_to_dicts(scores), f, indent=2)
        print(f"scores written to {cfg.out}")


def main(argv: list[str] | None = None) -> int:
    from unigen.configuration import run_cli

    return run_cli(WorldEvalConfig, _run, argv, prog="python -m unigen.scoring.world",
                   description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
