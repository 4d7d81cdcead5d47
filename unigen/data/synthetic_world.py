"""A synthetic multilingual image–text world for demos and tests (no downloads).

Scenes of one or two coloured shapes at named positions, drawn into small images; English
captions from templates; the same captions in five invented, rule-based languages with their
own vocabularies and word orders; QA pairs whose answer is a span of the English caption; and
text-only translation pairs. The data mirrors the paper's setting (§1, §4.1):

* ``IMAGE_LANGUAGES`` (``de``, ``fr``, ``ja``: the CC6L-like ones) occur with images;
* ``TEXT_ONLY_LANGUAGES`` (``es``, ``sw``) occur *only* in translation pairs with English, so
  anything the model learns about their image alignment comes through English as the pivot.

:func:`write_synthetic_world` writes everything in the real formats the sources read —
img2dataset-style webdataset shards (``key.jpg``/``key.txt``/``key.json``), CC6L JSON lines
(image languages only), CCQA JSON lines, ``WikiMatrix.<l1>-<l2>.tsv.gz`` for every language —
plus held-out evaluation splits with captions in *every* language. Everything is a pure
function of the seed. (The language names are suggestive only: the word lists are simplified
and partly invented, not real grammar.)
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle", "diamond")
# (x, y) centre as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
             "bottom": (0.5, 0.75), "middle": (0.5, 0.5)}

ENGLISH = "en"
IMAGE_LANGUAGES = ("de", "fr", "ja")
TEXT_ONLY_LANGUAGES = ("es", "sw")
LANGUAGES = (ENGLISH,) + IMAGE_LANGUAGES + TEXT_ONLY_LANGUAGES


@dataclass(frozen=True)
class Lexicon:
    """Words of one language and the order of an object phrase's parts.

    ``order`` lists the slots of one object phrase: ``art`` (article), ``col``, ``shape``,
    ``pos`` and literal words prefixed with ``=``; two objects are joined by ``conj``.
    """

    colours: dict
    shapes: dict
    positions: dict
    article: str
    conj: str
    order: tuple

    def phrase(self, colour: str, shape: str, position: str) -> str:
        slots = {"art": self.article, "col": self.colours[colour], "shape": self.shapes[shape],
                 "pos": self.positions[position]}
        words = [w[1:] if w.startswith("=") else slots[w] for w in self.order]
        return " ".join(w for w in words if w)


LEXICONS = {
    # adjective–noun–position: "a red circle on the left"
    "en": Lexicon(
        colours={c: c for c in COLOURS}, shapes={s: s for s in SHAPES},
        positions={"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom", "middle": "in the middle"},
        article="a", conj="and", order=("art", "col", "shape", "pos")),
    # position first, verb-second flavour: "links ist ein roter kreis"
    "de": Lexicon(
        colours={"red": "roter", "green": "grüner", "blue": "blauer", "yellow": "gelber",
                 "purple": "lila", "orange": "oranger"},
        shapes={"circle": "kreis", "square": "quadrat", "triangle": "dreieck", "diamond": "raute"},
        positions={"left": "links", "right": "rechts", "top": "oben", "bottom": "unten",
                   "middle": "mittig"},
        article="ein", conj="und", order=("pos", "=ist", "art", "col", "shape")),
    # noun–adjective–position: "un cercle rouge à gauche"
    "fr": Lexicon(
        colours={"red": "rouge", "green": "vert", "blue": "bleu", "yellow": "jaune",
                 "purple": "violet", "orange": "orange"},
        shapes={"circle": "cercle", "square": "carré", "triangle": "triangle",
                "diamond": "losange"},
        positions={"left": "à gauche", "right": "à droite", "top": "en haut",
                   "bottom": "en bas", "middle": "au centre"},
        article="un", conj="et", order=("art", "shape", "col", "pos")),
    # position–adjective–noun–verb, no article (SOV-like): "hidari ni akai maru ga aru"
    "ja": Lexicon(
        colours={"red": "akai", "green": "midori no", "blue": "aoi", "yellow": "kiiroi",
                 "purple": "murasaki no", "orange": "orenji no"},
        shapes={"circle": "maru", "square": "shikaku", "triangle": "sankaku",
                "diamond": "hishigata"},
        positions={"left": "hidari ni", "right": "migi ni", "top": "ue ni", "bottom": "shita ni",
                   "middle": "mannaka ni"},
        article="", conj="soshite", order=("pos", "col", "shape", "=ga", "=aru")),
    # existential first, noun–adjective: "a la izquierda hay un círculo rojo"
    "es": Lexicon(
        colours={"red": "rojo", "green": "verde", "blue": "azul", "yellow": "amarillo",
                 "purple": "morado", "orange": "naranja"},
        shapes={"circle": "círculo", "square": "cuadrado", "triangle": "triángulo",
                "diamond": "rombo"},
        positions={"left": "a la izquierda", "right": "a la derecha", "top": "arriba",
                   "bottom": "abajo", "middle": "en el centro"},
        article="un", conj="y", order=("pos", "=hay", "art", "shape", "col")),
    # noun–adjective–position, no article: "duara jekundu kushoto"
    "sw": Lexicon(
        colours={"red": "jekundu", "green": "kijani", "blue": "buluu", "yellow": "manjano",
                 "purple": "zambarau", "orange": "chungwa"},
        shapes={"circle": "duara", "square": "mraba", "triangle": "pembetatu",
                "diamond": "almasi"},
        positions={"left": "kushoto", "right": "kulia", "top": "juu", "bottom": "chini",
                   "middle": "katikati"},
        article="", conj="na", order=("shape", "col", "pos")),
}


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    position: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


def sample_scene(rng: np.random.Generator, max_objects: int = 2) -> Scene:
    """One or two objects at distinct positions."""
    n = int(rng.integers(1, max_objects + 1))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    names = list(POSITIONS)
    colours, shapes = list(COLOURS), list(SHAPES)
    return Scene(tuple(SceneObject(colours[int(rng.integers(len(colours)))],
                                   shapes[int(rng.integers(len(shapes)))],
                                   names[int(p)]) for p in positions))


def caption(scene: Scene, lang: str = ENGLISH) -> str:
    if lang not in LEXICONS:
        raise ValueError(f"unknown language {lang!r}; the world speaks {sorted(LEXICONS)}")
    lex = LEXICONS[lang]
    return f" {lex.conj} ".join(lex.phrase(o.colour, o.shape, o.position) for o in scene.objects)


# Question templates per language ({shape}, {col}, {pos}: that language's words). Every
# language can be asked; the training QA data is English only (as CCQA), and the translation
# pairs carry questions too, so English is the pivot for questions as well as for captions.
QUESTIONS = {
    "en": {"colour": "what color is the {shape}?", "shape": "what shape is {pos}?",
           "position": "where is the {col} {shape}?"},
    "de": {"colour": "welche farbe hat {shape}?", "shape": "welche form ist {pos}?",
           "position": "wo ist {col} {shape}?"},
    "fr": {"colour": "quelle couleur a le {shape}?", "shape": "quelle forme est {pos}?",
           "position": "où est le {shape} {col}?"},
    "ja": {"colour": "{shape} wa nani iro?", "shape": "{pos} nani ga aru?",
           "position": "{col} {shape} wa doko?"},
    "es": {"colour": "¿de qué color es el {shape}?", "shape": "¿qué forma hay {pos}?",
           "position": "¿dónde está el {shape} {col}?"},
    "sw": {"colour": "{shape} ni rangi gani?", "shape": "{pos} kuna umbo gani?",
           "position": "{shape} {col} iko wapi?"},
}
QUESTION_KINDS = ("colour", "shape", "position")


def question(kind: str, obj: SceneObject, lang: str = ENGLISH) -> str:
    """The ``kind`` question about ``obj`` in ``lang``."""
    if lang not in QUESTIONS:
        raise ValueError(f"unknown language {lang!r}; the world speaks {sorted(QUESTIONS)}")
    if kind not in QUESTION_KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {QUESTION_KINDS}")
    lex = LEXICONS[lang]
    return QUESTIONS[lang][kind].format(shape=lex.shapes[obj.shape], col=lex.colours[obj.colour],
                                        pos=lex.positions[obj.position])


def answer(kind: str, obj: SceneObject) -> str:
    """The English answer (a span of the English caption)."""
    return {"colour": obj.colour, "shape": obj.shape,
            "position": LEXICONS[ENGLISH].positions[obj.position]}[kind]


def pick_question(scene: Scene, rng: np.random.Generator) -> tuple[str, SceneObject]:
    """An unambiguous (kind, object): "what color is the <shape>?" needs the shape to be unique
    in the scene, and so on."""
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    shapes = [o.shape for o in scene.objects]
    kinds = ["shape"]  # positions are distinct, so "what shape is <position>?" always is
    if shapes.count(obj.shape) == 1:
        kinds.append("colour")
    if [(o.colour, o.shape) for o in scene.objects].count((obj.colour, obj.shape)) == 1:
        kinds.append("position")
    return kinds[int(rng.integers(len(kinds)))], obj


def question_answer(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """An English question about one object whose answer is a span of the English caption."""
    kind, obj = pick_question(scene, rng)
    return question(kind, obj), answer(kind, obj)


def render(scene: Scene, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """RGB uint8 image of the scene: jittered object sizes/positions on a tinted background."""
    from PIL import Image, ImageDraw

    bg = tuple(int(v) for v in 225 + rng.integers(-15, 16, size=3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fx, fy = POSITIONS[o.position]
        cx = fx * size + rng.uniform(-0.04, 0.04) * size
        cy = fy * size + rng.uniform(-0.04, 0.04) * size
        r = size * rng.uniform(0.10, 0.14)
        colour = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[o.colour])
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    return np.asarray(img)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # byte-identical shards for a given seed
    tar.addfile(info, io.BytesIO(data))


@dataclass
class WorldFiles:
    """Where :func:`write_synthetic_world` put everything (also saved as ``world.json``)."""

    root: str
    image_shards: list[str]
    cc6l: str
    ccqa: str
    wikimatrix: list[str]
    eval_image_shards: list[str]
    eval_captions: str
    eval_qa: str
    languages: tuple[str, ...] = LANGUAGES
    image_languages: tuple[str, ...] = IMAGE_LANGUAGES
    text_only_languages: tuple[str, ...] = TEXT_ONLY_LANGUAGES
    counts: dict = field(default_factory=dict)

    @classmethod
    def load(cls, root: str) -> "WorldFiles":
        with open(os.path.join(root, "world.json")) as f:
            d = json.load(f)
        rel = {k: v for k, v in d.items()}
        for k in ("image_shards", "wikimatrix", "eval_image_shards"):
            rel[k] = [os.path.join(root, p) for p in d[k]]
        for k in ("cc6l", "ccqa", "eval_captions", "eval_qa"):
            rel[k] = os.path.join(root, d[k])
        for k in ("languages", "image_languages", "text_only_languages"):
            rel[k] = tuple(d[k])
        rel["root"] = root
        return cls(**rel)


def _write_image_split(root: str, sub: str, key_fmt: str, n: int, rng, image_size: int,
                       shard_size: int, quality: int, max_objects: int = 2):
    """Shards of ``n`` scenes; returns (shard paths, [(key, scene)])."""
    os.makedirs(os.path.join(root, sub), exist_ok=True)
    shards, items = [], []
    for s, start in enumerate(range(0, n, shard_size)):
        path = os.path.join(root, sub, f"{s:05d}.tar")
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(n, start + shard_size)):
                key = key_fmt.format(i)
                scene = sample_scene(rng, max_objects)
                text = caption(scene, ENGLISH)
                meta = {"key": key, "caption": text, "status": "success",
                        "width": image_size, "height": image_size,
                        "scene": [dataclasses.asdict(o) for o in scene.objects]}
                _add_member(tar, f"{key}.jpg", encode_jpeg(render(scene, rng, image_size), quality))
                _add_member(tar, f"{key}.txt", text.encode())
                _add_member(tar, f"{key}.json", json.dumps(meta).encode())
                items.append((key, scene))
        shards.append(path)
    return shards, items


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_synthetic_world(out_dir: str, *, num_images: int = 2000, num_text_pairs: int = 1000,
                          num_eval_images: int = 200, image_size: int = 64,
                          shard_size: int = 500, low_score_fraction: float = 0.05,
                          question_fraction: float = 0.3, max_objects: int = 2, seed: int = 0,
                          jpeg_quality: int = 90) -> WorldFiles:
    """Write the world's training and evaluation files under ``out_dir`` (see module doc).

    Args:
        num_images: training images (webdataset shards of ``shard_size``; each gets a CC6L
            line and one QA pair).
        num_text_pairs: translation pairs per non-English language.
        num_eval_images: held-out images with captions in every language and a QA pair.
        low_score_fraction: share of WikiMatrix rows that pair *unrelated* sentences and get a
            margin score under 1.04, as noisy mined pairs do (the reader's ``min_score``
            filters them).
        question_fraction: share of translation pairs that are questions about a scene
            rather than captions (text only: no image is involved).
        max_objects: objects per scene, 1 or 2 (1 makes a world a tiny model learns faster).
    """
    for name, value in (("num_images", num_images), ("num_eval_images", num_eval_images),
                        ("num_text_pairs", num_text_pairs), ("shard_size", shard_size),
                        ("image_size", image_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 pixels, got {image_size}")
    if not 0.0 <= low_score_fraction < 1.0:
        raise ValueError(f"low_score_fraction must be in [0, 1), got {low_score_fraction!r}")
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, got {max_objects!r}")
    if not 0.0 <= question_fraction <= 1.0:
        raise ValueError(f"question_fraction must be in [0, 1], got {question_fraction!r}")
    os.makedirs(out_dir, exist_ok=True)
    # independent streams per part: changing one count leaves the other parts unchanged
    rng_train, rng_eval, rng_qa, rng_text, rng_q = (np.random.default_rng([seed, i])
                                                    for i in range(5))

    shards, train = _write_image_split(out_dir, "images", "{:09d}", num_images, rng_train,
                                       image_size, shard_size, jpeg_quality, max_objects)
    cc6l = os.path.join(out_dir, "cc6l", "captions.jsonl")
    os.makedirs(os.path.dirname(cc6l), exist_ok=True)
    _write_jsonl(cc6l, ({"key": k,
                         "captions": {l: caption(s, l) for l in (ENGLISH,) + IMAGE_LANGUAGES}}
                        for k, s in train))
    ccqa = os.path.join(out_dir, "ccqa", "qa.jsonl")
    os.makedirs(os.path.dirname(ccqa), exist_ok=True)
    qa_rows = []
    for k, s in train:
        q, a = question_answer(s, rng_qa)
        qa_rows.append({"key": k, "caption": caption(s), "question": q, "answer": a})
    _write_jsonl(ccqa, qa_rows)

    wm_dir = os.path.join(out_dir, "wikimatrix")
    os.makedirs(wm_dir, exist_ok=True)
    wikimatrix = []
    for lang in IMAGE_LANGUAGES + TEXT_ONLY_LANGUAGES:
        # real WikiMatrix names order the pair alphabetically (de-en but en-fr)
        l1, l2 = sorted((lang, ENGLISH))
        path = os.path.join(wm_dir, f"WikiMatrix.{l1}-{l2}.tsv.gz")
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            for _ in range(num_text_pairs):
                scene = sample_scene(rng_text, max_objects)
                other = scene
                if rng_text.random() < low_score_fraction:
                    other, score = sample_scene(rng_text, max_objects), rng_text.uniform(1.0, 1.03)
                else:
                    score = rng_text.uniform(1.05, 1.3)
                if rng_q.random() < question_fraction:
                    kind, obj = pick_question(scene, rng_q)
                    other_kind, other_obj = (kind, obj) if other is scene else pick_question(other, rng_q)
                    cols = {lang: question(kind, obj, lang),
                            ENGLISH: question(other_kind, other_obj, ENGLISH)}
                else:
                    cols = {lang: caption(scene, lang), ENGLISH: caption(other, ENGLISH)}
                f.write(f"{score:.4f}\t{cols[l1]}\t{cols[l2]}\n".encode())
        wikimatrix.append(path)

    eval_shards, held_out = _write_image_split(out_dir, "eval/images", "eval{:06d}",
                                               num_eval_images, rng_eval, image_size,
                                               shard_size, jpeg_quality, max_objects)
    eval_captions = os.path.join(out_dir, "eval", "captions.jsonl")
    _write_jsonl(eval_captions, ({"key": k, "captions": {l: caption(s, l) for l in LANGUAGES}}
                                 for k, s in held_out))
    eval_qa = os.path.join(out_dir, "eval", "qa.jsonl")
    rows = []
    for k, s in held_out:
        kind, obj = pick_question(s, rng_eval)
        rows.append({"key": k, "caption": caption(s), "question": question(kind, obj),
                     "answer": answer(kind, obj),
                     "questions": {l: question(kind, obj, l) for l in LANGUAGES}})
    _write_jsonl(eval_qa, rows)

    files = WorldFiles(root=out_dir, image_shards=shards, cc6l=cc6l, ccqa=ccqa,
                       wikimatrix=wikimatrix, eval_image_shards=eval_shards,
                       eval_captions=eval_captions, eval_qa=eval_qa,
                       counts={"images": num_images, "text_pairs_per_language": num_text_pairs,
                               "eval_images": num_eval_images, "seed": seed,
                               "max_objects": max_objects,
                               "image_size": image_size})
    manifest = dataclasses.asdict(files)
    manifest.pop("root")
    for k in ("image_shards", "wikimatrix", "eval_image_shards"):
        manifest[k] = [os.path.relpath(p, out_dir) for p in manifest[k]]
    for k in ("cc6l", "ccqa", "eval_captions", "eval_qa"):
        manifest[k] = os.path.relpath(manifest[k], out_dir)
    with open(os.path.join(out_dir, "world.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return files


def all_texts(files: WorldFiles) -> list[str]:
    """Every sentence of the world (for training the demo's tiny tokenizers)."""
    from .stream import iter_text_lines

    texts = []
    for path in files.wikimatrix:
        for _, line in iter_text_lines(path):
            texts.extend(line.split("\t")[1:])
    for path in (files.cc6l, files.eval_captions):
        with open(path, encoding="utf-8") as f:
            for line in f:
                texts.extend(json.loads(line)["captions"].values())
    for path in (files.ccqa, files.eval_qa):
        with open(path, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                texts.extend((row["question"], row["answer"]))
                texts.extend(row.get("questions", {}).values())
    return texts


def main(argv=None) -> None:
    """``python -m unigen.data.synthetic_world OUT_DIR [--num-images N ...]``."""
    import argparse
    import time

    from unigen.version import add_version_argument

    prog = "python -m unigen.data.synthetic_world"
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Write UniGen's synthetic multilingual world.")
    add_version_argument(parser, prog)
    parser.add_argument("out_dir")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--num-text-pairs", type=int, default=1000,
                        help="translation pairs per non-English language")
    parser.add_argument("--num-eval-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-objects", type=int, default=2, choices=(1, 2),
                        help="shapes per image")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    files = write_synthetic_world(args.out_dir, num_images=args.num_images,
                                  num_text_pairs=args.num_text_pairs,
                                  num_eval_images=args.num_eval_images,
                                  image_size=args.image_size, shard_size=args.shard_size,
                                  max_objects=args.max_objects, seed=args.seed)
    print(f"wrote {args.num_images} images in {len(files.image_shards)} shards, "
          f"{args.num_text_pairs} translation pairs for each of "
          f"{len(IMAGE_LANGUAGES + TEXT_ONLY_LANGUAGES)} languages and "
          f"{args.num_eval_images} held-out images to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
