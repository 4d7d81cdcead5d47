"""A feature store: the frozen ViT's output for every image of a data set, computed once
(``python -m unigen.data.prepare image-features``, :mod:`unigen.data.feature_extraction`) and
read back in training instead of decoding JPEGs and running the ViT (``data.image_features``).

On disk::

    DIR/manifest.json                  what made the features (below); a run checks it
    DIR/shards/<unit>-<part>.safetensors
                                       "features" [n, K, tokens, width] (fp32, bf16 or fp8),
                                       "scales" [n, K] float32 (fp8 only), "crop_boxes"
                                       [n, K, 4] int32 (top, left, height, width; with crops);
                                       metadata "keys": the n image keys, JSON
    DIR/done/<unit>.json               a finished source unit: its files and their keys, the
                                       images that did not decode, the samples without image

A *unit* is one source shard (a webdataset tar, named by its file name without extension) or
one slice of an image folder's sorted files (IGLUE); a key is the image's webdataset key, or
its path below the folder. K is the number of views per image: 1 (the image resized, no
augmentation) by default, or K RandomResizedCrop draws, one used per epoch.

Why safetensors: a maintained format (Hugging Face's; already a dependency, read by torch,
numpy, JAX and Rust alike) with a fixed header of dtype, shape and byte offsets and nothing
executable in it, native bf16 and float8 e4m3 dtypes, and zero-copy memory-mapped reads, so one
image's ``[tokens, width]`` row is read without touching the rest of its file.

The manifest records the ViT's weights (sha256 of the tensors as the model holds them), the
vision config fields the output depends on, whether it ran under bf16 autocast, the image
preprocessing (size, filter, normalisation), the encoding, the views (count, crop range, seed)
and the source units. A run whose model, preprocessing or options the store cannot honour is
refused with :class:`FeatureStoreError`, one line naming the option.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from unigen.configuration import ConfigError
from unigen.model.vit_features import FEATURE_DTYPES, ImageFeatures, vision_fingerprint

from .errors import DataFormatError

STORE_FORMAT = "unigen-vit-features"
STORE_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
DONE_DIR = "done"


class FeatureStoreError(ConfigError):
    """A feature store that cannot serve a run: missing, incomplete, made from other weights or
    other images, or asked for something it cannot give. The message names the option."""

    def __init__(self, message: str):
        super().__init__(message, kind="invalid")


@dataclass(kw_only=True)
class StoreManifest:
    """What made a store's features (``manifest.json``); two stores hold interchangeable
    features exactly when everything but ``sources`` is equal."""

    vit_sha256: str
    """sha256 of the ViT's weights (:func:`unigen.model.vit_features.vit_weights_hash`)."""
    vision: dict
    """The vision-config fields the ViT's output depends on
    (:func:`unigen.model.vit_features.vision_fingerprint`)."""
    autocast: str
    """"bf16" when the ViT ran under bf16 autocast (a GPU run's ``run.precision``), else
    "none"."""
    image_size: int
    """Side of the square the images were resized to."""
    interpolation: str
    """The resize filter (bilinear or bicubic; PIL)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    """The normalisation ``(x / 255 - mean) / std``."""
    dtype: str
    """The encoding of the stored values: fp32, bf16 or fp8 (e4m3, per-image scale)."""
    tokens: int
    width: int
    """One view's ``[tokens, width]``."""
    views: int = 1
    """Views per image; epoch ``e`` of a source reads view ``e % views``."""
    random_resized_crop: tuple[float, float] | None = None
    """The crops' area range (views are RandomResizedCrop draws), or None (the whole image)."""
    crop_seed: int = 0
    """Seeds the crop boxes: view ``k`` of key ``x`` draws from ``(crop_seed, x, k)``."""
    sources: dict = dataclasses.field(default_factory=dict)
    """``{"kind": "webdataset" | "folder", "units": [...], ...}``: the units a complete store
    has (a folder source also records its root and image count)."""

    def __post_init__(self):
        if self.dtype not in FEATURE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {self.dtype!r}")
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        self.mean, self.std = tuple(self.mean), tuple(self.std)
        if self.random_resized_crop is not None:
            self.random_resized_crop = tuple(float(x) for x in self.random_resized_crop)

    @property
    def bytes_per_view(self) -> int:
        """Stored bytes of one image view (the fp8 scale included)."""
        itemsize = torch.empty(0, dtype=FEATURE_DTYPES[self.dtype]).element_size()
        return self.tokens * self.width * itemsize + (4 if self.dtype == "fp8" else 0)

    def to_json(self) -> dict:
        return {"format": STORE_FORMAT, "version": STORE_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict, where: str) -> "StoreManifest":
        if data.get("format") != STORE_FORMAT or data.get("version") != STORE_VERSION:
            raise FeatureStoreError(f"{where} is not a version-{STORE_VERSION} {STORE_FORMAT} "
                                    f"manifest (format {data.get('format')!r}, version "
                                    f"{data.get('version')!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in fields})
        except (TypeError, ValueError) as exc:
            raise FeatureStoreError(f"{where}: bad manifest ({exc})") from None

    def differences(self, other: "StoreManifest") -> list[str]:
        """The fields (``sources`` aside) in which ``other`` differs, as ``name: ours vs
        theirs``."""
        out = []
        for f in dataclasses.fields(self):
            if f.name == "sources":
                continue
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name}: {_short(a)} vs {_short(b)}")
        return out


def _short(value) -> str:
    text = repr(value)
    return text[:19] + "…'" if isinstance(value, str) and len(value) > 20 else text


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST_NAME)


def read_manifest(directory: str) -> StoreManifest:
    path = manifest_path(directory)
    if not os.path.isfile(path):
        raise FeatureStoreError(f"{directory!r} is not a feature store (no {MANIFEST_NAME}); "
                                f"make one with python -m unigen.data.prepare image-features "
                                f"CONFIG --out {directory}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatureStoreError(f"{path}: cannot read the manifest ({exc})") from None
    return StoreManifest.from_json(data, path)


def shard_unit_name(path: str) -> str:
    """The unit of a webdataset shard: its file name without the tar extension (img2dataset's
    ``00042.tar`` is unit ``00042``)."""
    base = os.path.basename(path)
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[:-len(suffix)]
    return base


def unit_file(directory: str, unit: str) -> str:
    """Where a finished unit's record is (``done/<unit>.json``)."""
    return os.path.join(directory, DONE_DIR, f"{unit}.json")


@dataclass(frozen=True)
class StoredImage:
    """A sample's image in a feature-store run: its key and the view of the sample's epoch
    (what the streams put where the encoded bytes would be)."""

    key: str
    view: int


class StoredImageRefs:
    """``(key, epoch) -> StoredImage``: epoch ``e`` of a stream reads view ``e % views`` (a
    pure function of the stream's position, so a resumed run reads the same views)."""

    def __init__(self, views: int):
        self.views = int(views)

    def __call__(self, key: str, epoch: int) -> StoredImage:
        return StoredImage(key, epoch % self.views)


class FeatureStore:
    """Read access to a store (module docstring): ``lookup(key, view)`` gives one image's
    :class:`ImageFeatures` (None for an image the extraction could not decode), and the
    ``check_*`` methods refuse a run the store cannot serve. The key index is built from the
    ``done/`` records when it is opened; file handles are opened lazily per process (and
    dropped after a fork), so a store can be handed to DataLoader workers."""

    max_open_files = 64

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        self.manifest = read_manifest(self.directory)
        self.files: list[str] = []
        self.done_units: set[str] = set()
        self.undecodable: dict[str, str] = {}
        self._where: dict[str, tuple[int, int]] = {}
        done_dir = os.path.join(self.directory, DONE_DIR)
        names = sorted(os.listdir(done_dir)) if os.path.isdir(done_dir) else []
        for name in names:
            if name.endswith(".json"):
                self._index_unit(os.path.join(done_dir, name))
        self._handles: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._pid = os.getpid()

    def _index_unit(self, path: str) -> None:
        try:
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            unit, files = record["unit"], record["files"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FeatureStoreError(f"{path}: not a finished-unit record ({exc}); remove it and "
                                    f"rerun the extraction for that unit") from None
        self.done_units.add(unit)
        for entry in files:
            index = len(self.files)
            self.files.append(os.path.join(self.directory, SHARDS_DIR, entry["name"]))
            for row, key in enumerate(entry["keys"]):
                if key in self._where:
                    raise FeatureStoreError(f"{self.directory}: key {key!r} is stored twice "
                                            f"(unit {unit} and another); image keys must be "
                                            f"unique across the sources")
                self._where[key] = (index, row)
        self.undecodable.update(record.get("undecodable", {}))

    # ---- completeness and compatibility -------------------------------------------------------
    @property
    def missing_units(self) -> list[str]:
        return sorted(set(self.manifest.sources.get("units", ())) - self.done_units)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where or key in self.undecodable

    def require_units(self, units, option: str) -> None:
        """Every unit of ``units`` (what a run reads) is extracted, else the error says how far
        the extraction got and to rerun it."""
        missing = sorted(set(units) - self.done_units)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            total = len(self.manifest.sources.get("units", ()))
            raise FeatureStoreError(
                f"{option}: the store {self.directory!r} has no features of {len(missing)} "
                f"source unit(s) the run reads ({shown}); {len(self.done_units)} of {total} "
                f"units are extracted: rerun python -m unigen.data.prepare image-features "
                f"(it resumes) with the config naming these sources")

    def check_preprocessing(self, *, image_size: int, interpolation: str,
                            random_resized_crop, mean, std, names: dict[str, str]) -> None:
        """The run's image preprocessing is the store's, else an error naming the option
        (``names``: the run's option for each of image_size, interpolation,
        random_resized_crop, mean, std)."""
        m = self.manifest
        crop = None if random_resized_crop is None else tuple(float(x) for x in
                                                               random_resized_crop)
        checks = (("image_size", image_size, m.image_size),
                  ("interpolation", interpolation, m.interpolation),
                  ("random_resized_crop", crop, m.random_resized_crop),
                  ("mean", tuple(mean), m.mean), ("std", tuple(std), m.std))
        for field, ours, theirs in checks:
            if ours != theirs:
                hint = (" (a store's views are the crops it was extracted with: extract one "
                        "with this crop range, or set the option to the store's)"
                        if field == "random_resized_crop" else "")
                raise FeatureStoreError(
                    f"{names[field]} = {ours!r} but the feature store {self.directory!r} was "
                    f"made with {theirs!r}: its features come from other images{hint}")

    def check_vit(self, vision, weights_hash: str, autocast: str) -> None:
        """The run's ViT is the one that made the store: frozen, the same config fields, the
        same weights, the same autocast (else: which one differs)."""
        m = self.manifest
        if not vision.frozen:
            raise FeatureStoreError("model.vision.frozen is false: a trained ViT's output "
                                    "changes every step, a feature store holds a frozen one's "
                                    "(data.image_features needs the ViT frozen)")
        ours = vision_fingerprint(vision)
        for field, value in ours.items():
            if m.vision.get(field) != value:
                raise FeatureStoreError(
                    f"model.vision.{field} = {value!r} but the feature store "
                    f"{self.directory!r} was made by a ViT with {m.vision.get(field)!r}")
        if weights_hash != m.vit_sha256:
            raise FeatureStoreError(
                f"the model's ViT weights (sha256 {weights_hash[:12]}…) are not those the "
                f"feature store {self.directory!r} was made with ({m.vit_sha256[:12]}…): "
                f"extract a store from this model's weights (init.clip_dir, "
                f"init.from_pretrained or the fine-tuned model)")
        if autocast != m.autocast:
            raise FeatureStoreError(
                f"run.precision gives {'bf16 autocast' if autocast == 'bf16' else 'no autocast'} "
                f"but the feature store {self.directory!r} was computed "
                f"{'under bf16 autocast' if m.autocast == 'bf16' else 'without autocast'}: the "
                f"ViT's output differs; set run.precision to match or extract again")

    # ---- reading ------------------------------------------------------------------------------
    def _handle(self, index: int):
        if self._pid != os.getpid():  # fresh handles after a fork into a loader worker
            self._handles, self._pid = collections.OrderedDict(), os.getpid()
        handle = self._handles.get(index)
        if handle is None:
            from safetensors import safe_open

            path = self.files[index]
            try:
                opened = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors' own errors on a missing or truncated file
                raise DataFormatError(path, None, f"cannot read feature file ({exc})") from None
            scales = opened.get_tensor("scales") if self.manifest.dtype == "fp8" else None
            handle = self._handles[index] = (opened, opened.get_slice("features"), scales)
            if len(self._handles) > self.max_open_files:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(index)
        return handle

    def lookup(self, key: str, view: int = 0) -> ImageFeatures | None:
        """The features of ``key``'s view ``view`` (one row), or None when the extraction found
        its image undecodable. A key the store does not hold is a :class:`DataFormatError`."""
        where = self._where.get(key)
        if where is None:
            if key in self.undecodable:
                return None
            raise DataFormatError(self.directory, None,
                                  f"image {key!r} is not in the feature store (data."
                                  f"image_features); was it extracted from these sources?")
        if not 0 <= view < self.manifest.views:
            raise ValueError(f"view {view} out of range: the store holds {self.manifest.views}")
        index, row = where
        _, features, scales = self._handle(index)
        values = features[row:row + 1, view]
        return ImageFeatures(values, None if scales is None else scales[row:row + 1, view].clone())

    def lookup_many(self, keys: list[str], views: list[int]) -> tuple[ImageFeatures | None,
                                                                       list[int]]:
        """Features of the decodable ones among ``keys`` (in order) and their positions."""
        parts, ok = [], []
        for i, (key, view) in enumerate(zip(keys, views)):
            found = self.lookup(key, view)
            if found is not None:
                parts.append(found)
                ok.append(i)
        return (ImageFeatures.cat(parts) if parts else None), ok

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = collections.OrderedDict(), None
        return state


def check_store_vit(store: FeatureStore, model, amp_dtype) -> None:
    """``store`` was made by ``model``'s ViT as the run will run it (``amp_dtype``: the run's
    autocast dtype, None without): :meth:`FeatureStore.check_vit` on a built UniGen (call it
    before the model is sharded: the hash reads every ViT weight)."""
    from unigen.model.vit_features import vit_weights_hash

    store.check_vit(model.config.vision, vit_weights_hash(model.image_encoder.clip),
                    "none" if amp_dtype is None else "bf16")


class StoredFeatureDecoder:
    """The batch collate's image decoder for a feature-store run: ``decode(stored images) ->
    (ImageFeatures, ok)``, the interface of :class:`~unigen.data.image_pipeline.PilImageDecoder`;
    an image the extraction could not decode is left out of ``ok``, so its sample is dropped and
    reported exactly as the pixel path drops it."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def decode(self, images) -> tuple[ImageFeatures | None, list[int]]:
        if len(images) == 0:
            raise ValueError("decode() needs at least one image")
        for image in images:
            if not isinstance(image, StoredImage):
                raise TypeError(f"a feature-store run's samples carry StoredImage references, "
                                f"got {type(image).__name__}")
        return self.store.lookup_many([i.key for i in images], [i.view for i in images])
