"""IGLUE's evaluation protocol as files of its ``datasets/`` folder: per task, the English
training (and dev) files of the zero-shot fine-tune, the target languages and their test files,
and the few-shot continuations (``train_<N>`` files, the shots IGLUE's experiments ran).

Paths are relative to the IGLUE ``datasets/`` folder, exactly as the public repository lays
them out; IGLUE ships a few large English training files zipped (``train.jsonl.zip``): unzip
them in place. Table 1 reports few-shot results at the largest shot (``headline_shot``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskProtocol:
    task: str
    train: str
    """The English training file of the zero-shot fine-tune."""
    dev: str
    """Its English dev file (best epoch)."""
    test: str
    """Zero-shot test file of a language: ``{lang}`` is replaced."""
    languages: tuple[str, ...]
    """The target languages (Table 1 averages over them)."""
    few_shot_train: str = ""
    """Few-shot training file: ``{lang}`` and ``{shot}`` are replaced; "" = no few-shot."""
    few_shot_test: str = ""
    """Few-shot test file (xGQA's few-shot split differs from its zero-shot one); "" = test."""
    few_shot_languages: tuple[str, ...] = ()
    shots: tuple[str, ...] = ()
    headline_shot: str = ""
    """The shot Table 1's few-shot row reports (IGLUE's largest)."""

    def test_file(self, lang: str, few_shot: bool = False) -> str:
        pattern = self.few_shot_test if few_shot and self.few_shot_test else self.test
        return pattern.format(lang=lang)

    def train_file(self, lang: str, shot: str) -> str:
        return self.few_shot_train.format(lang=lang, shot=shot)


PROTOCOLS = {
    "xvnli": TaskProtocol(
        "xvnli", "XVNLI/annotations/en/train.jsonl", "XVNLI/annotations/en/dev.jsonl",
        "XVNLI/annotations/{lang}/test.jsonl", ("ar", "es", "fr", "ru"),
        "XVNLI/annotations/{lang}/train_{shot}.jsonl", "", ("ar", "es", "fr", "ru"),
        ("1", "5", "10", "20", "25", "48"), "48"),
    "xgqa": TaskProtocol(
        "xgqa", "gqa/annotations/train.json", "gqa/annotations/valid.json",
        "xGQA/annotations/zero_shot/testdev_balanced_questions_{lang}.json",
        ("bn", "de", "id", "ko", "pt", "ru", "zh"),
        "xGQA/annotations/few_shot/{lang}/train_{shot}.json",
        "xGQA/annotations/few_shot/{lang}/test.json", ("bn", "de", "id", "ko", "pt", "ru", "zh"),
        ("1", "5", "10", "20", "25", "48"), "48"),
    # MaRVL: trained on NLVR2 (English), tested on MaRVL; few-shot in three languages.
    "marvl": TaskProtocol(
        "marvl", "nlvr2/annotations/train.jsonl", "nlvr2/annotations/dev.jsonl",
        "marvl/zero_shot/annotations/marvl-{lang}.jsonl", ("id", "sw", "ta", "tr", "zh"),
        "marvl/few_shot/annotations/marvl-{lang}_train{shot}.jsonl", "", ("id", "tr", "zh"),
        ("1", "2", "4", "10", "10x2"), "10"),
    # xFlickr&CO: trained on Flickr30k (English).
    "xflickrco": TaskProtocol(
        "xflickrco", "flickr30k/annotations/train_ann.jsonl",
        "flickr30k/annotations/valid_ann.jsonl", "xFlickrCO/annotations/{lang}/test.jsonl",
        ("de", "es", "id", "ja", "ru", "tr", "zh"),
        "xFlickrCO/annotations/{lang}/train_{shot}.jsonl", "",
        ("de", "es", "id", "ja", "ru", "tr", "zh"), ("1", "5", "10", "25", "50", "100"), "100"),
    # WIT has no few-shot files (Table 1: "-").
    "wit": TaskProtocol(
        "wit", "wit/annotations/train_en.jsonl", "wit/annotations/val_en.jsonl",
        "wit/annotations/test_{lang}.jsonl",
        ("ar", "bg", "da", "el", "et", "id", "ja", "ko", "tr", "vi")),
}
# Table 1's column order.
TABLE_TASKS = ("xvnli", "xgqa", "marvl", "xflickrco", "wit")
