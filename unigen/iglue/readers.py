"""IGLUE's task files (paper §4.3.1), read as IGLUE releases them (its ``datasets/`` folder)
into one record type for fine-tuning and evaluation.

Every IGLUE task is cast as UniGen's generative [qus] task or as retrieval (paper §4.2: "for
classification tasks, such as XVNLI, we trained the model to output corresponding keywords";
xGQA answers are generated from the whole vocabulary):

* ``xvnli``: JSON lines with ``Flikr30kID`` (image ``<id>.jpg``), ``sentence2`` (the hypothesis,
  the encoder text) and ``gold_label`` → the keyword yes / maybe / no (entailment / neutral /
  contradiction); ``pairID`` is the key. SNLI's "-" labels (no annotator consensus) are skipped
  and counted, as IGLUE does.
* ``xgqa``: GQA JSON ``{question_id: {imageId, question, answer, ...}}`` (image
  ``<imageId>.jpg``): GQA's ``train.json`` / ``testdev_balanced_questions.json``, xGQA's
  ``zero_shot/testdev_balanced_questions_<lang>.json`` and ``few_shot/<lang>/{train_<N>,dev,
  test}.json`` → the answer.
* ``marvl``: JSON lines, MaRVL (``language``, ``concept``, ``left_img``, ``right_img``,
  ``caption``, ``label``; zero-shot files name a file of the concept's folder, ``26-6.jpg``,
  few-shot ones the folder too, ``39-Panci/39-n-5.jpg``) or NLVR2 (``identifier``,
  ``sentence``, ``label``; images ``<pair>-img0.png`` and ``<pair>-img1.png``) → yes / no.
* ``xflickrco``: JSON lines with ``img_path`` (or ``id``: ``<id>.jpg``) and ``sentences`` (the
  image's captions); ``id`` is a string for Flickr30k images and an integer for COCO ones.
  Every caption is a query, an empty one included (IGLUE's German and Indonesian test files
  each hold one): IGLUE's retrieval keeps every image in the gallery and every caption.
* ``wit``: JSON lines, one caption each (``wit_ix``, ``image_url``,
  ``caption_reference_description``, ``language``, ...); the lines of one ``wit_ix`` are one
  image with several captions (IGLUE's test files hold up to 24 per image).

A record whose label is not one of the task's is skipped and counted; a malformed line raises
:class:`~unigen.data.errors.DataFormatError` naming the file and line. Image names are resolved
under an image root by :mod:`unigen.iglue.images`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from unigen.data.errors import DataFormatError

IGLUE_TASKS = ("xvnli", "xgqa", "marvl", "xflickrco", "wit")
# Image-text retrieval (L_CL + [match]); the others generate an answer after [qus].
RETRIEVAL_TASKS = ("xflickrco", "wit")
# The keyword each class label is trained to generate.
XVNLI_WORDS = {"entailment": "yes", "neutral": "maybe", "contradiction": "no"}
MARVL_WORDS = {True: "yes", False: "no"}


@dataclass(frozen=True)
class IGLUERecord:
    """One example of an IGLUE task.

    uid: the file's own key (pairID, question id, MaRVL/NLVR2 id, image path or wit_ix).
    images: image names relative to the image root (two for MaRVL/NLVR2, else one); also the
        image's identity in a batch.
    texts: the encoder inputs: one hypothesis/question/statement, or an image's captions.
    answer: the English target (a keyword or a GQA answer); None for retrieval records.
    language, concept: MaRVL's, which place its images (``<root>/<language>/images/<concept>/``).
    image_url: WIT's, whose decoded file name is the image's second name.
    line: where the record starts in its file (errors about its images name it).
    """

    uid: str
    images: tuple[str, ...]
    texts: tuple[str, ...]
    answer: str | None
    language: str | None = None
    concept: str | None = None
    image_url: str | None = None
    line: int | str | None = None


@dataclass
class IGLUEFile:
    """The records of one file, how many entries were skipped (no usable label) and, for
    retrieval, how many captions are empty (kept as queries; not trainable)."""

    path: str
    task: str
    records: list[IGLUERecord]
    skipped: int = 0
    empty_texts: int = 0


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
            if kind is int and not (isinstance(value, (str, int)) and not isinstance(value, bool)
                                    and str(value).strip()):
                raise DataFormatError(path, line, f"field {name!r} must be a string or an "
                                                  f"integer id, got {value!r}")
            return value
    raise DataFormatError(path, line, f"missing field {' or '.join(map(repr, names))}")


def _read_xvnli(path: str) -> IGLUEFile:
    out = IGLUEFile(path, "xvnli", [])
    for n, row in _json_lines(path):
        label = _field(row, ("gold_label",), path, n)
        if label not in XVNLI_WORDS:
            out.skipped += 1
            continue
        image = str(_field(row, ("Flikr30kID", "Flickr30kID"), path, n, kind=int))
        uid = str(row.get("pairID", f"{os.path.basename(path)}:{n}"))
        out.records.append(IGLUERecord(uid, (f"{image}.jpg",),
                                       (_field(row, ("sentence2",), path, n),), XVNLI_WORDS[label],
                                       line=n))
    return out


def _read_json_object(path: str, what: str):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, e.lineno, f"not a {what} JSON file ({e.msg})") from None


def _read_xgqa(path: str) -> IGLUEFile:
    data = _read_json_object(path, "GQA")
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
                                       _field(q, ("answer",), path, where), line=where))
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
            out.records.append(IGLUERecord(ident, (f"{pair}-img0.png", f"{pair}-img1.png"),
                                           (_field(row, ("sentence",), path, n),),
                                           MARVL_WORDS[label], line=n))
            continue
        # MaRVL: file names repeat across languages (7-8.jpg is in every language's release),
        # so the record's language and concept are part of its images' identity.
        language = _field(row, ("language",), path, n)
        concept = _field(row, ("concept",), path, n)
        images = tuple(_field(row, (side,), path, n) for side in ("left_img", "right_img"))
        uid = str(row.get("id", f"{os.path.basename(path)}:{n}"))
        out.records.append(IGLUERecord(
            uid, tuple(f"{language}/{concept}/{os.path.basename(i)}" for i in images),
            (_field(row, ("caption",), path, n),), MARVL_WORDS[label], language=language,
            concept=concept, line=n))
    return out


def _captions(value, path, line, name) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, str) for s in value):
        raise DataFormatError(path, line, f"{name!r} must be a non-empty list of strings, got "
                                          f"{value!r}")
    return value


def _read_xflickrco(path: str) -> IGLUEFile:
    out = IGLUEFile(path, "xflickrco", [])
    order: dict[str, int] = {}  # image → its record: a repeated image adds captions (volta's way)
    for n, row in _json_lines(path):
        if "img_path" in row:
            image = _field(row, ("img_path",), path, n)
        else:
            image = f"{_field(row, ('id',), path, n, kind=int)}.jpg"
        sentences = _captions(_field(row, ("sentences",), path, n, kind=object), path, n,
                              "sentences")
        out.empty_texts += sum(not s.strip() for s in sentences)
        if image in order:
            old = out.records[order[image]]
            out.records[order[image]] = IGLUERecord(old.uid, old.images,
                                                    old.texts + tuple(sentences), None,
                                                    line=old.line)
        else:
            order[image] = len(out.records)
            out.records.append(IGLUERecord(image, (image,), tuple(sentences), None, line=n))
    return out


def _read_wit(path: str) -> IGLUEFile:
    out = IGLUEFile(path, "wit", [])
    order: dict[str, int] = {}
    for n, row in _json_lines(path):
        ix = str(_field(row, ("wit_ix",), path, n, kind=int))
        url = _field(row, ("image_url",), path, n)
        caption = _field(row, ("caption_reference_description",), path, n, kind=object)
        if not isinstance(caption, str):
            raise DataFormatError(path, n, f"'caption_reference_description' must be a string, "
                                           f"got {caption!r}")
        out.empty_texts += not caption.strip()
        if ix in order:
            old = out.records[order[ix]]
            if old.image_url != url:
                raise DataFormatError(path, n, f"wit_ix {ix!r} names image {url!r} here but "
                                               f"{old.image_url!r} on line {old.line}")
            out.records[order[ix]] = IGLUERecord(ix, old.images, old.texts + (caption,), None,
                                                 image_url=url, line=old.line)
        else:
            order[ix] = len(out.records)
            out.records.append(IGLUERecord(ix, (ix,), (caption,), None, image_url=url, line=n))
    return out


_READERS = {"xvnli": _read_xvnli, "xgqa": _read_xgqa, "marvl": _read_marvl,
            "xflickrco": _read_xflickrco, "wit": _read_wit}


def read_iglue(task: str, path: str | os.PathLike) -> IGLUEFile:
    """The records of one IGLUE file of ``task`` (formats in the module docstring)."""
    check_task(task, "read_iglue")
    path = os.fspath(path)
    if not os.path.isfile(path):
        hint = (f" (IGLUE ships it zipped: unzip {path}.zip)"
                if os.path.isfile(path + ".zip") else "")
        raise FileNotFoundError(f"read_iglue: {path!r} is not a file{hint}")
    out = _READERS[task](path)
    if not out.records:
        raise DataFormatError(path, None, f"no usable {task} records ({out.skipped} skipped "
                                          f"for their label)")
    return out


def read_answer_set(path: str | os.PathLike) -> list[str]:
    """IGLUE's closed xGQA answer set: ``trainval_label2ans.json`` (a JSON list, label i →
    answer) or a ``{label: answer}`` / ``{answer: label}`` object (``trainval_ans2label.json``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"answer set: {path!r} is not a file")
    data = _read_json_object(path, "label→answer")
    if isinstance(data, dict):
        if all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
            data = sorted(data, key=data.get)  # ans2label: answers in label order
        else:
            data = list(data.values())
    if not isinstance(data, list) or not data:
        raise DataFormatError(path, None, "expected a non-empty JSON list of answers or a "
                                          "{label: answer} object")
    for i, a in enumerate(data):
        if not isinstance(a, str) or not a.strip():
            raise DataFormatError(path, f"label {i}", f"answer must be a non-empty string, got "
                                                     f"{a!r}")
    if len(set(data)) != len(data):
        raise DataFormatError(path, None, "answers repeat")
    return data
