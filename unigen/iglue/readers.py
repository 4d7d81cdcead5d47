"""IGLUE's task files (paper §4.3.1), read into one record type for fine-tuning and evaluation.

Every IGLUE task is cast as UniGen's generative [qus] task or as retrieval (paper §4.2: "for
classification tasks, such as XVNLI, we trained the model to output corresponding keywords";
xGQA answers are generated from the whole vocabulary):

* ``xvnli``: JSON lines with ``Flikr30kID`` (image ``<id>.jpg``), ``sentence2`` (the hypothesis,
  the encoder text) and ``gold_label`` → the keyword yes / maybe / no (entailment / neutral /
  contradiction); ``pairID`` is the key.
* ``xgqa``: GQA JSON ``{question_id: {imageId, question, answer}}`` (image ``<imageId>.jpg``) →
  the answer.
* ``marvl``: JSON lines, MaRVL (``left_img``, ``right_img``, ``caption``, ``label``) or NLVR2
  (``identifier``, ``sentence``, ``label``; images ``<pair>-img0.png`` and ``<pair>-img1.png``)
  → yes / no (label true / false).
* ``xflickrco``: JSON lines with ``img_path`` (or ``id``: ``<id>.jpg``) and ``sentences`` (the
  image's captions): retrieval, trained with L_CL and [match].

A record whose label is not one of the task's (SNLI's "-", no annotator consensus) is skipped
and counted; a malformed line raises :class:`~unigen.data.errors.DataFormatError` naming the
file and line. Image names are resolved under an image root by :mod:`unigen.iglue.images`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from unigen.data.errors import DataFormatError

IGLUE_TASKS = ("xvnli", "xgqa", "marvl", "xflickrco")
# The keyword each class label is trained to generate.
XVNLI_WORDS = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
MARVL_WORDS = {True: "yes", False: "no"}


@dataclass(frozen=True)
class IGLUERecord:
    """One example of an IGLUE task.

    uid: the file's own key (pairID, question id, MaRVL/NLVR2 id, image path for retrieval).
    images: image names relative to the image root (two for MaRVL/NLVR2, else one).
    texts: the encoder inputs: one hypothesis/question/statement, or an image's captions.
    answer: the English target (a keyword or a GQA answer); None for retrieval records.
    """

    uid: str
    images: tuple[str, ...]
    texts: tuple[str, ...]
    answer: str | None


@dataclass
class IGLUEFile:
    """The records of one file and how many of its entries were skipped (no usable label)."""

    path: str
    task: str
    records: list[IGLUERecord]
    skipped: int = 0


def check_task(task: str, op: str) -> str:
    if task not in IGLUE_TASKS:
        raise ValueError(f"{op}: task must be one of {IGLUE_TASKS}, got {task!r}")
    return task


def _json_lines(path: str):
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(path, n, f"not a JSON line ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataFormatError(path, n, f"expected a JSON object, got {type(row).__name__}")
            yield n, row


def _field(row: dict, names: tuple[str, ...], path: str, line, kind=str):
    for name in names:
        if name in row:
            value = row[name]
            if kind is str and not (isinstance(value, str) and value.strip()):
                raise DataFormatError(path, line, f"field {name!r} must be a non-empty string, "
                                                  f"got {value!r}")
            return value
    raise DataFormatError(path, line, f"missing field {' or '.join(map(repr, names))}")


def _read_xvnli(path: str) -> IGLUEFile:
    out = IGLUEFile(path, "xvnli", [])
    for n, row in _json_lines(path):
        label = _field(row, ("gold_label",), path, n)
        if label not in XVNLI_WORDS:
            out.skipped += 1
            continue
        image = str(_field(row, ("Flikr30kID", "Flickr30kID"), path, n, kind=object))
        uid = str(row.get("pairID", f"{os.path.basename(path)}:{n}"))
        out.records.append(IGLUERecord(uid, (f"{image}.jpg",),
                                       (_field(row, ("sentence2",), path, n),), XVNLI_WORDS[label]))
    return out


def _read_xgqa(path: str) -> IGLUEFile:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, f"not a GQA JSON file ({e.msg})") from None
    if not isinstance(data, dict):
        raise DataFormatError(path, None, "expected a JSON object {question_id: question}")
    out = IGLUEFile(path, "xgqa", [])
    for qid, q in data.items():
        where = f"question {qid}"
        if not isinstance(q, dict):
            raise DataFormatError(path, where, f"expected an object, got {type(q).__name__}")
        image = _field(q, ("imageId",), path, where)
        out.records.append(IGLUERecord(str(qid), (f"{image}.jpg",),
                                       (_field(q, ("question",), path, where),),
                                       _field(q, ("answer",), path, where)))
    return out


def _bool_label(value, path, line) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataFormatError(path, line, f"label must be true/false, got {value!r}")


def _read_marvl(path: str) -> IGLUEFile:
    out = IGLUEFile(path, "marvl", [])
    for n, row in _json_lines(path):
        label = _bool_label(_field(row, ("label",), path, n, kind=object), path, n)
        if "identifier" in row and "left_img" not in row:
            # NLVR2: sentence dev-850-0-1 is about images dev-850-0-img0.png and -img1.png
            ident = _field(row, ("identifier",), path, n)
            pair = ident.rsplit("-", 1)[0]
            images = (f"{pair}-img0.png", f"{pair}-img1.png")
            uid, text = ident, _field(row, ("sentence",), path, n)
        else:
            images = (_field(row, ("left_img",), path, n), _field(row, ("right_img",), path, n))
            uid = str(row.get("id", f"{os.path.basename(path)}:{n}"))
            text = _field(row, ("caption",), path, n)
        out.records.append(IGLUERecord(uid, images, (text,), MARVL_WORDS[label]))
    return out


def _read_xflickrco(path: str) -> IGLUEFile:
    out = IGLUEFile(path, "xflickrco", [])
    for n, row in _json_lines(path):
        if "img_path" in row:
            image = _field(row, ("img_path",), path, n)
        else:
            image = f"{_field(row, ('id',), path, n, kind=object)}.jpg"
        sentences = _field(row, ("sentences",), path, n, kind=object)
        if isinstance(sentences, str):
            sentences = [sentences]
        if (not isinstance(sentences, list) or not sentences
                or not all(isinstance(s, str) and s.strip() for s in sentences)):
            raise DataFormatError(path, n, f"'sentences' must be a non-empty list of non-empty "
                                           f"strings, got {sentences!r}")
        out.records.append(IGLUERecord(image, (image,), tuple(sentences), None))
    return out


_READERS = {"xvnli": _read_xvnli, "xgqa": _read_xgqa, "marvl": _read_marvl,
            "xflickrco": _read_xflickrco}


def read_iglue(task: str, path: str | os.PathLike) -> IGLUEFile:
    """The records of one IGLUE file of ``task`` (formats in the module docstring)."""
    check_task(task, "read_iglue")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_iglue: {path!r} is not a file")
    out = _READERS[task](path)
    if not out.records:
        raise DataFormatError(path, None, f"no usable {task} records ({out.skipped} skipped "
                                          f"for their label)")
    return out
