"""``python -m unigen.data.prepare image-features CONFIG --out DIR``: the frozen ViT over every
image of a training config's image sources, once, into a feature store
(:mod:`unigen.data.feature_store`).

What is extracted, from the config (read as ``python -m unigen.data.check`` reads it):

* a pre-training config: the webdataset shards of ``data.image_shards`` (the CC3M images that
  captioning reads, and that CC6L's and CCQA's keys join), preprocessed as the training loader
  does (``data.image_size``, ``data.interpolation``, CLIP's normalisation; with
  ``data.random_resized_crop``, K RandomResizedCrop views per image), by the ViT of
  ``init.from_pretrained`` or ``init.clip_dir``;
* a fine-tuning config (it has a ``task``): every image file below ``data.images`` (an IGLUE
  image folder), keyed by its path below it and preprocessed as fine-tuning does (PIL bicubic
  to ``vision.image_size``), by the ViT of ``model``.

The ViT runs as the model runs it (:func:`unigen.model.image_encoder.vit_forward`: its
``compute_dtype``, and bf16 autocast where the config's ``run.precision`` gives it on the
device), so a stored feature is the value the training step would compute.

The work is split into units (a shard, or a slice of a folder's sorted files); under torchrun
process ``r`` of ``w`` takes units ``r, r + w, ...``. A unit's files are written under
temporary names, renamed when complete, and its ``done/<unit>.json`` written last: a stopped
extraction is restarted with the same command and skips the finished units. Images that do not
decode are skipped, reported with shard and key and recorded, so training drops their samples
as it drops them from pixels; a manifest made for other weights, preprocessing or encoding is
refused (use another ``--out``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from unigen.configuration import ConfigError, config_from_dict, read_config_file
from unigen.model.config import UniGenConfig
from unigen.model.vit_features import (
    FEATURE_DTYPES,
    ImageFeatures,
    encode,
    feature_shape,
    vision_fingerprint,
    vit_weights_hash,
)

from .config import DataConfig
from .feature_store import (
    DONE_DIR,
    SHARDS_DIR,
    FeatureStoreError,
    StoreManifest,
    manifest_path,
    read_manifest,
    shard_unit_name,
    unit_file,
)
from .image_pipeline import (
    IMAGE_FILE_EXTENSIONS,
    ImageSpec,
    crop_resize_rgb,
    decode_rgb_pil,
    normalize_rgb,
    random_crop_box,
    resize_rgb_pil,
)
from .webdataset_images import iter_shard_images, tar_shards


@dataclass
class Unit:
    """One piece of the extraction's work: a webdataset shard, or a slice of a folder's
    files (``files``: paths below ``root``, which are the keys)."""

    name: str
    source: str
    root: str = ""
    files: tuple[str, ...] = ()


@dataclass
class ExtractionPlan:
    """What a config asks to extract (see the module docstring)."""

    kind: str
    """"webdataset" (a pre-training config) or "folder" (an IGLUE fine-tuning config)."""
    units: list[Unit]
    spec: ImageSpec
    """The preprocessing: size, filter, normalisation (no crop: the views draw their own)."""
    crop_scale: tuple[float, float] | None
    """RandomResizedCrop's area range of the views, or None."""
    vit_source: str
    """Where the ViT's weights come from (for the log)."""
    load_vit: Callable[[], tuple[torch.nn.Module, object]]
    """Builds ``(clip, vision config)`` with the weights loaded (on the CPU)."""
    precision: str
    """The config's ``run.precision``: decides bf16 autocast with the device."""
    sources: dict = dataclasses.field(default_factory=dict)


def _listing_digest(files: list[str]) -> str:
    return hashlib.sha256("\n".join(files).encode()).hexdigest()


def model_config_section(raw: dict) -> UniGenConfig:
    """The ``model`` section of a pre-training config file read as a plain dict (a preset's
    name, ``model: paper``, or fields), as the run reads it."""
    section = raw.get("model", {})
    if isinstance(section, str):
        section = {"preset": section}
    return config_from_dict(UniGenConfig, section or {}, prefix="model")


def _webdataset_plan(raw: dict, path: str) -> ExtractionPlan:
    from unigen.model.image_encoder import (
        build_frozen_clip,
        load_clip_vision_weights,
        vision_config_from_clip_dir,
    )
    from unigen.model.pretrained import load_frozen_vit

    model = model_config_section(raw)
    data = config_from_dict(DataConfig, raw.get("data") or {}, prefix="data")
    init = raw.get("init") or {}
    if not data.image_shards:
        raise ConfigError(f"{path}: data.image_shards names no image shard: nothing to extract")
    if init.get("from_pretrained"):
        source = init["from_pretrained"]

        def load_vit():
            return load_frozen_vit(source)
    elif init.get("clip_dir"):
        source = init["clip_dir"]

        def load_vit():
            vision = vision_config_from_clip_dir(source, model.vision)
            clip = build_frozen_clip(vision)
            load_clip_vision_weights(clip, vision, source)
            return clip, vision
    else:
        raise ConfigError(f"{path}: the config's ViT has no pre-trained weights (init.clip_dir "
                          f"and init.from_pretrained are empty); a feature store is made from "
                          f"the weights a run starts from")
    shards = tar_shards(list(data.image_shards))
    units = [Unit(shard_unit_name(p), p) for p in shards]
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{path}: data.image_shards holds shards of the same name in "
                          f"different folders ({', '.join(twice[:5])}): a store names its units "
                          f"by shard name")
    size = data.image_size or model.vision.image_size
    return ExtractionPlan(
        kind="webdataset", units=units, spec=ImageSpec(size, data.interpolation),
        crop_scale=data.random_resized_crop, vit_source=source, load_vit=load_vit,
        precision=(raw.get("run") or {}).get("precision", "auto"),
        sources={"kind": "webdataset", "units": names})


def _folder_plan(raw: dict, path: str, images_per_file: int) -> ExtractionPlan:
    from unigen.model.pretrained import load_frozen_vit

    if raw.get("task") == "marvl" and raw.get("pair_images", "side_by_side") == "side_by_side":
        raise FeatureStoreError(
            "pair_images=side_by_side pastes MaRVL's two images into one before the ViT, which "
            "a store of single images cannot give; set pair_images: two_prefixes (each image "
            "its own prefix) to fine-tune from stored features")
    model_dir = raw.get("model")
    root = (raw.get("data") or {}).get("images")
    if not isinstance(model_dir, str) or not model_dir:
        raise ConfigError(f"{path}: model must name the pre-trained model directory")
    if not isinstance(root, str) or not os.path.isdir(root):
        raise ConfigError(f"{path}: data.images ({root!r}) is not an image folder")
    files = sorted(os.path.relpath(os.path.join(folder, f), root)
                   for folder, _, names in os.walk(root) for f in names
                   if os.path.splitext(f)[1].lower() in IMAGE_FILE_EXTENSIONS)
    if not files:
        raise ConfigError(f"{path}: data.images ({root!r}) holds no image file "
                          f"({', '.join(IMAGE_FILE_EXTENSIONS)})")
    units = [Unit(f"part-{i // images_per_file:05d}", root, root,
                  tuple(files[i:i + images_per_file]))
             for i in range(0, len(files), images_per_file)]
    config_json = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_json):
        raise ConfigError(f"{path}: model ({model_dir!r}) holds no config.json: name a "
                          f"save_pretrained folder")
    vision = UniGenConfig.load(config_json).vision
    return ExtractionPlan(
        kind="folder", units=units,
        # fine-tuning's preprocessing: PIL bicubic straight to the model's size, its mean/std
        spec=ImageSpec(vision.image_size, "bicubic", vision.image_mean, vision.image_std),
        crop_scale=None, vit_source=model_dir, load_vit=lambda: load_frozen_vit(model_dir),
        precision=(raw.get("run") or {}).get("precision", "auto"),
        sources={"kind": "folder", "root": os.path.abspath(root), "images": len(files),
                 "listing_sha256": _listing_digest(files), "units": [u.name for u in units]})


def plan_from_config(path: str, *, images_per_file: int = 512) -> ExtractionPlan:
    """The extraction a training config asks for (module docstring)."""
    raw = read_config_file(path)
    if "task" in raw:  # only fine-tuning configs (unigen.iglue.config) name a task
        return _folder_plan(raw, path, images_per_file)
    return _webdataset_plan(raw, path)


# ---- reading and preprocessing the images (in loader workers) ----------------------------------
def _key_seed(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def view_boxes(key: str, height: int, width: int, views: int, crop_scale, crop_seed: int
               ) -> list[tuple[int, int, int, int]]:
    """The RandomResizedCrop box of each view of ``key``: view ``k`` draws from
    ``(crop_seed, key, k)`` alone, so a box does not depend on the process, the order or the
    other views."""
    return [random_crop_box(height, width, crop_scale,
                            np.random.default_rng([crop_seed, _key_seed(key), k]))
            for k in range(views)]


@dataclass
class _Item:
    unit: str
    key: str
    origin: str
    pixels: torch.Tensor | None = None
    """[K, 3, S, S] normalised views, or None: the image does not decode."""
    boxes: list | None = None
    end: dict | None = None
    """Set on a unit's last item (no image): the unit's counts of samples without image."""


class _UnitImages(torch.utils.data.IterableDataset):
    """Each image of the units as its preprocessed views, then an end item per unit; loader
    worker ``w`` of ``W`` takes units ``w, w + W, ...`` (a unit's items stay in order)."""

    def __init__(self, units: list[Unit], spec: ImageSpec, views: int, crop_scale, crop_seed):
        self.units, self.spec, self.views = units, spec, views
        self.crop_scale, self.crop_seed = crop_scale, crop_seed

    def _views(self, key: str, data: bytes):
        rgb = decode_rgb_pil(data)
        if self.crop_scale is None:  # exactly the training loader's resize
            return normalize_rgb(resize_rgb_pil(rgb, self.spec), self.spec).unsqueeze(0), None
        boxes = view_boxes(key, rgb.shape[0], rgb.shape[1], self.views, self.crop_scale,
                           self.crop_seed)
        return torch.stack([normalize_rgb(crop_resize_rgb(rgb, b, self.spec), self.spec)
                            for b in boxes]), boxes

    def _images(self, unit: Unit) -> Iterator[tuple[str, str, bytes | None]]:
        """(key, origin, encoded bytes or None for a sample without image)."""
        if unit.files:
            for rel in unit.files:
                with open(os.path.join(unit.root, rel), "rb") as f:
                    yield rel, os.path.join(unit.root, rel), f.read()
        else:
            for key, data in iter_shard_images(unit.source):
                yield key, f"{unit.source}[{key}]", data

    def __iter__(self) -> Iterator[_Item]:
        info = torch.utils.data.get_worker_info()
        mine = self.units if info is None else self.units[info.id::info.num_workers]
        for unit in mine:
            no_image = 0
            for key, origin, data in self._images(unit):
                if data is None:
                    no_image += 1
                    continue
                try:
                    pixels, boxes = self._views(key, data)
                except Exception:  # as the training loader: any decoder failure skips the image
                    pixels, boxes = None, None
                yield _Item(unit.name, key, origin, pixels, boxes)
            yield _Item(unit.name, "", "", end={"no_image": no_image})


# ---- writing ------------------------------------------------------------------------------------
class _UnitWriter:
    """One unit's output: parts of ``images_per_file`` images, then its done record."""

    def __init__(self, out: str, unit: Unit, images_per_file: int, dtype: str):
        self.out, self.unit, self.per_file, self.dtype = out, unit, images_per_file, dtype
        self.keys: list[str] = []
        self.values: list[ImageFeatures] = []  # one [K, T, D] entry per image
        self.boxes: list = []
        self.files: list[dict] = []
        self.undecodable: dict[str, str] = {}
        self.stored = 0
        # a stopped run's parts of this unit (and only this unit's: "00001-x" is another one)
        mine = re.compile(re.escape(unit.name) + r"-\d{5}\.safetensors(\.tmp\d+)?")
        for name in os.listdir(os.path.join(out, SHARDS_DIR)):
            if mine.fullmatch(name):
                os.remove(os.path.join(out, SHARDS_DIR, name))

    def add(self, key: str, views: ImageFeatures, boxes) -> None:
        self.keys.append(key)
        self.values.append(views)
        self.boxes.append(boxes)
        if len(self.keys) == self.per_file:
            self.flush()

    def flush(self) -> None:
        if not self.keys:
            return
        from safetensors.torch import save_file

        name = f"{self.unit.name}-{len(self.files):05d}.safetensors"
        tensors = {"features": torch.stack([v.values for v in self.values]).contiguous()}
        if self.values[0].scales is not None:
            tensors["scales"] = torch.stack([v.scales for v in self.values])
        if self.boxes[0] is not None:
            tensors["crop_boxes"] = torch.tensor(self.boxes, dtype=torch.int32)
        final = os.path.join(self.out, SHARDS_DIR, name)
        tmp = f"{final}.tmp{os.getpid()}"
        save_file(tensors, tmp, metadata={"keys": json.dumps(self.keys), "unit": self.unit.name})
        os.replace(tmp, final)
        self.files.append({"name": name, "keys": self.keys})
        self.stored += len(self.keys)
        self.keys, self.values, self.boxes = [], [], []

    def finish(self, no_image: int) -> dict:
        self.flush()
        record = {"unit": self.unit.name, "source": self.unit.source, "images": self.stored,
                  "no_image": no_image, "undecodable": self.undecodable, "files": self.files}
        _write_json(unit_file(self.out, self.unit.name), record)
        return record


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prepare_store(out: str, manifest: StoreManifest) -> None:
    """The store folder with this manifest; an existing manifest must describe the same
    features and sources (a store is never mixed)."""
    os.makedirs(os.path.join(out, SHARDS_DIR), exist_ok=True)
    os.makedirs(os.path.join(out, DONE_DIR), exist_ok=True)
    if os.path.isfile(manifest_path(out)):
        old = read_manifest(out)
        diff = old.differences(manifest)
        if diff:
            raise FeatureStoreError(
                f"--out {out!r} holds a store made with other settings ({'; '.join(diff)}: "
                f"the store's vs this config's); its features cannot be mixed with these: "
                f"choose another --out")
        keep = ("units", "images", "listing_sha256")
        if {k: old.sources.get(k) for k in keep} != {k: manifest.sources.get(k) for k in keep}:
            raise FeatureStoreError(
                f"--out {out!r} holds a store of other sources ({len(old.sources.get('units', ()))} "
                f"units then, {len(manifest.sources.get('units', ()))} now); choose another --out")
        return
    # every process of a torchrun job writes the same manifest: the last rename wins, whole
    _write_json(manifest_path(out), manifest.to_json())


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def extract_features(plan: ExtractionPlan, out: str, *, dtype: str = "bf16", views: int = 1,
                     crop_seed: int = 0, batch_size: int = 64, images_per_file: int = 512,
                     workers: int = 2, device: str = "auto", rank: int | None = None,
                     world_size: int | None = None, log=print) -> dict:
    """Run the extraction of ``plan`` into ``out`` (module docstring); returns this process's
    counts."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(FEATURE_DTYPES)}, got {dtype!r}")
    for name, value in (("--views", views), ("--batch-size", batch_size),
                        ("--images-per-file", images_per_file)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if views > 1 and plan.crop_scale is None:
        raise ValueError(f"--views {views} needs crops: without data.random_resized_crop in the "
                         f"config every view would be the same resized image")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    tag = f"image-features [rank {rank}/{world_size}]" if world_size > 1 else "image-features"
    dev = _device(device)
    clip, vision = plan.load_vit()
    if vision.image_size != plan.spec.size:
        raise ConfigError(f"data.image_size ({plan.spec.size}) must equal the ViT's image size "
                          f"({vision.image_size}, model.vision.image_size)")
    # the training core's rule (unigen.training.optim.autocast_dtype)
    autocast = plan.precision == "bf16" or (plan.precision == "auto" and dev.type == "cuda")
    tokens, width = feature_shape(vision)
    manifest = StoreManifest(
        vit_sha256=vit_weights_hash(clip), vision=vision_fingerprint(vision),
        autocast="bf16" if autocast else "none", image_size=plan.spec.size,
        interpolation=plan.spec.interpolation, mean=plan.spec.mean, std=plan.spec.std,
        dtype=dtype, tokens=tokens, width=width, views=views,
        random_resized_crop=plan.crop_scale, crop_seed=crop_seed if plan.crop_scale else 0,
        sources=plan.sources)
    _prepare_store(out, manifest)
    clip.to(dev)
    mine = plan.units[rank::world_size]
    pending = [u for u in mine if not os.path.isfile(unit_file(out, u.name))]
    log(f"{tag}: {len(plan.units)} {plan.kind} unit(s), this process takes {len(mine)} "
        f"({len(mine) - len(pending)} done before); ViT from {plan.vit_source} on {dev}"
        f"{' (bf16 autocast)' if autocast else ''}, {dtype}, {views} view(s) of "
        f"{tokens}x{width} per image = {manifest.bytes_per_view * views / 1e3:.1f} KB")
    counts = {"units": 0, "images": 0, "undecodable": 0, "no_image": 0,
              "skipped_units": len(mine) - len(pending)}
    if not pending:
        return counts
    loader = torch.utils.data.DataLoader(
        _UnitImages(pending, plan.spec, views, plan.crop_scale, crop_seed), batch_size=None,
        num_workers=workers, prefetch_factor=4 if workers else None)
    writers = {u.name: _UnitWriter(out, u, images_per_file, dtype) for u in pending}
    batch: list[_Item] = []
    start = last_report = time.monotonic()

    def run_vit():
        from unigen.model.image_encoder import vit_forward

        if not batch:
            return
        pixels = torch.cat([item.pixels for item in batch]).to(dev, non_blocking=True)
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16,
                                                    enabled=autocast):
            feats = vit_forward(clip, vision, pixels)
        encoded = encode(feats, dtype)
        values = encoded.values.cpu().view(len(batch), views, tokens, width)
        scales = None if encoded.scales is None else encoded.scales.cpu().view(len(batch), views)
        for i, item in enumerate(batch):
            writers[item.unit].add(item.key, ImageFeatures(values[i],
                                                           None if scales is None else scales[i]),
                                   item.boxes)
        counts["images"] += len(batch)
        batch.clear()

    for item in loader:
        if item.end is not None:
            run_vit()  # the unit's last images, before its record
            record = writers.pop(item.unit).finish(item.end["no_image"])
            counts["units"] += 1
            counts["no_image"] += record["no_image"]
            elapsed = time.monotonic() - start
            rate = counts["images"] / max(elapsed, 1e-9)
            left = len(pending) - counts["units"]
            log(f"{tag}: unit {item.unit} done: {record['images']} images"
                f" ({len(record['undecodable'])} undecodable, {record['no_image']} without "
                f"image) in {len(record['files'])} file(s); {counts['units']}/{len(pending)} "
                f"units, {rate:.1f} images/s"
                + (f", about {left * elapsed / counts['units'] / 60:.1f} min left" if left else ""))
            continue
        if item.pixels is None:
            writers[item.unit].undecodable[item.key] = item.origin
            counts["undecodable"] += 1
            log(f"{tag}: skipped an image that does not decode: {item.origin} "
                f"({counts['undecodable']} so far)")
            continue
        batch.append(item)
        if len(batch) == batch_size:
            run_vit()
        if time.monotonic() - last_report > 60:
            last_report = time.monotonic()
            log(f"{tag}: {counts['images']} images, "
                f"{counts['images'] / (last_report - start):.1f} images/s")
    return counts


def store_summary(out: str) -> str:
    """One line: how complete the store at ``out`` is and what it holds."""
    from .feature_store import FeatureStore

    store = FeatureStore(out)
    m = store.manifest
    total = len(m.sources.get("units", ()))
    size = sum(os.path.getsize(p) for p in set(store.files) if os.path.isfile(p))
    state = "complete" if not store.missing_units else \
        f"{len(store.missing_units)} unit(s) still to extract"
    return (f"image-features: {out}: {len(store.done_units)} of {total} units ({state}), "
            f"{len(store)} images ({len(store.undecodable)} undecodable), {m.views} view(s), "
            f"{m.dtype}, {size / 1e9:.3f} GB")

