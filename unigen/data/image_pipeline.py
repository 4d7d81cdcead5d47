"""Images → CLIP-normalised 224×224 tensors, through NVIDIA DALI or a PIL + numpy fallback.

Both paths do the same three steps, chosen so they agree up to JPEG-decoder and resize rounding:

1. decode to RGB uint8 (DALI: nvJPEG on the GPU with ``device="mixed"`` when CUDA is there,
   libjpeg-turbo on the CPU otherwise; PIL: libjpeg-turbo);
2. resize straight to ``size × size`` (BLIP-2's evaluation processor squashes rather than
   crops, and UniGen's image encoder is BLIP-2's, §4.2) with the same filter on both sides:
   bilinear by default, antialiased when shrinking (PIL always antialiases, DALI's
   ``antialias=True``); an image already at the target size is not resampled;
3. CLIP normalisation ``(x / 255 - mean) / std`` with CLIP's mean and std, CHW float32.

Measured agreement (tests/data/test_image_pipeline.py, DALI 2.4 CPU vs Pillow): images already
at the target size come out identical (both decode with libjpeg-turbo); bilinear resizing
differs by at most one uint8 step (1/255 before normalisation, mean under 0.3 steps), up and
down, smooth images and sharp-edged ones. Bicubic differs by up to 8 steps at sharp edges (the
two libraries' cubic kernels differ), so bilinear is the default.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unigen.model.config import CLIP_MEAN, CLIP_STD

INTERPOLATIONS = ("bilinear", "bicubic")
IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")
"""Extensions (lower-cased) of the image files an image folder holds (IGLUE's releases)."""


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class ImageSpec:
    """How an image becomes a model input."""

    size: int = 224
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    crop_scale: tuple[float, float] | None = None
    """BLIP-2's pre-training augmentation, RandomResizedCrop: a crop of a random fraction of the
    image's area in this range (BLIP-2: 0.5-1) and aspect ratio in [3/4, 4/3] (torchvision's),
    resized to ``size``; None resizes the whole image. No horizontal flip: captions say left and
    right."""
    seed: int = 0
    """Seeds the crops (a decoder in a DataLoader worker mixes in the worker's id)."""

    def __post_init__(self):
        if self.crop_scale is not None:
            lo, hi = (float(x) for x in self.crop_scale)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"ImageSpec.crop_scale must be (low, high) with 0 < low <= high "
                                 f"<= 1, got {self.crop_scale!r}")
            object.__setattr__(self, "crop_scale", (lo, hi))
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"ImageSpec.size must be a positive int, got {self.size!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"ImageSpec.interpolation must be one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("ImageSpec.mean/std need 3 values each, std > 0")


def decode_rgb_pil(data: bytes) -> np.ndarray:
    """Encoded image → RGB uint8 HWC array (raises on a corrupt image)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return np.asarray(img.convert("RGB"))


def resize_rgb_pil(rgb: np.ndarray, spec: ImageSpec) -> np.ndarray:
    from PIL import Image

    if rgb.shape[0] == spec.size and rgb.shape[1] == spec.size:
        return rgb
    resample = Image.BILINEAR if spec.interpolation == "bilinear" else Image.BICUBIC
    return np.asarray(Image.fromarray(rgb).resize((spec.size, spec.size), resample=resample))


def normalize_rgb(rgb: np.ndarray, spec: ImageSpec) -> torch.Tensor:
    """uint8 HWC → CLIP-normalised float32 CHW tensor."""
    x = rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


_ASPECT = (3.0 / 4.0, 4.0 / 3.0)


def random_crop_box(height: int, width: int, scale: tuple[float, float],
                    rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a RandomResizedCrop box, torchvision's rule: up to 10 draws of an
    area fraction in ``scale`` and a log-uniform aspect ratio in [3/4, 4/3] until the box fits,
    else the whole image."""
    area = height * width
    log_lo, log_hi = np.log(_ASPECT[0]), np.log(_ASPECT[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ratio = float(np.exp(rng.uniform(log_lo, log_hi)))
        w = int(round(np.sqrt(target * ratio)))
        h = int(round(np.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return 0, 0, height, width


def crop_resize_rgb(rgb: np.ndarray, box: tuple[int, int, int, int], spec: ImageSpec) -> np.ndarray:
    """The ``(top, left, h, w)`` box of ``rgb`` resized to ``size × size`` with the spec's
    filter (RandomResizedCrop's second half; a box already at the size is not resampled)."""
    top, left, h, w = box
    crop = rgb[top:top + h, left:left + w]
    if crop.shape[:2] == (spec.size, spec.size):
        return np.ascontiguousarray(crop)
    from PIL import Image

    resample = Image.BILINEAR if spec.interpolation == "bilinear" else Image.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
        (spec.size, spec.size), resample=resample))


class PilImageTransform:
    """The fallback path for one image: bytes → ``[3, size, size]`` float32 (picklable)."""

    def __init__(self, spec: ImageSpec | None = None):
        self.spec = spec or ImageSpec()
        self._rng = None

    def _crop(self, rgb: np.ndarray) -> np.ndarray:
        if self._rng is None:  # first use in this process: mix in the loader worker's id
            from torch.utils.data import get_worker_info

            info = get_worker_info()
            self._rng = np.random.default_rng([self.spec.seed, 0 if info is None else info.id + 1])
        box = random_crop_box(rgb.shape[0], rgb.shape[1], self.spec.crop_scale, self._rng)
        return crop_resize_rgb(rgb, box, self.spec)

    def __call__(self, data: bytes) -> torch.Tensor:
        rgb = decode_rgb_pil(data)
        rgb = self._crop(rgb) if self.spec.crop_scale else resize_rgb_pil(rgb, self.spec)
        return normalize_rgb(rgb, self.spec)


def _dali_device(device: str) -> str:
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("device='gpu' asked for, but CUDA is not available")
    return device


def _dali_image_graph(encoded, spec: ImageSpec, device: str, resize: bool = True):
    """decode → resize → normalise, as DALI operators (the same graph for both entry points)."""
    from nvidia.dali import fn, types

    images = fn.decoders.image(encoded, device="mixed" if device == "gpu" else "cpu",
                               output_type=types.RGB)
    interp = types.INTERP_LINEAR if spec.interpolation == "bilinear" else types.INTERP_CUBIC
    if spec.crop_scale is not None:  # the same rule as random_crop_box, DALI's random stream
        images = fn.random_resized_crop(images, size=[spec.size, spec.size],
                                        random_area=list(spec.crop_scale),
                                        random_aspect_ratio=list(_ASPECT), interp_type=interp,
                                        antialias=True, seed=spec.seed)
    elif resize:
        images = fn.resize(images, resize_x=spec.size, resize_y=spec.size, interp_type=interp,
                           antialias=True)
    return fn.crop_mirror_normalize(
        images, dtype=types.FLOAT, output_layout="CHW",
        mean=[255.0 * m for m in spec.mean], std=[255.0 * s for s in spec.std])


def _dali_to_torch(tensor_list, device: str) -> torch.Tensor:
    """A dense DALI TensorList → torch tensor (copied; DALI reuses its buffers)."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32,
                      device="cuda" if device == "gpu" else "cpu")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream() if device == "gpu" else None)
    return out


@contextlib.contextmanager
def _stderr_held_back(keep: list[str]):
    """Collect what native code writes to file descriptor 2 meanwhile into ``keep`` (DALI's
    C++ logger prints raw lines such as ``[jpeg_parser] Invalid marker`` that name no file)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            keep.append(tmp.read().decode("utf-8", "replace"))


class DaliImageDecoder:
    """Batched decode of encoded images already in memory (the mixed-task loader's path).

    ``decode(list_of_bytes)`` → ``(images [n_ok, 3, size, size], ok_indices)``. A batch that
    DALI cannot decode is retried image by image with PIL to find the corrupt ones, which are
    dropped and reported through ``ok_indices`` (never a crash mid-epoch).
    """

    def __init__(self, spec: ImageSpec | None = None, *, max_batch_size: int = 256,
                 device: str = "auto", num_threads: int = 2, device_id: int | None = None):
        if not dali_available():
            raise ImportError("NVIDIA DALI is not installed (pip install -e '.[dali-cuda13]', or "
                              "'.[dali-cuda12]' for CUDA 12); use data.image_backend=pil instead")
        self.spec = spec or ImageSpec()
        self.device = _dali_device(device)
        self.max_batch_size = int(max_batch_size)
        self.num_threads = int(num_threads)
        if self.device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.device_id = device_id if self.device == "gpu" else None
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=self.max_batch_size, num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, no_copy=False)
            return _dali_image_graph(encoded, self.spec, self.device)

        p = pipe()
        p.build()
        return p

    def _run(self, arrays: list[np.ndarray]) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        # A failed batch is retried image by image and each corrupt image reported by name
        # (see decode), so DALI's own nameless lines about it are dropped; output of a batch
        # that decodes is passed on.
        held: list[str] = []
        with _stderr_held_back(held):
            try:
                self._pipe.feed_input("encoded", arrays)
                (out,) = self._pipe.run()
                failed = False
            except RuntimeError:
                failed = True
        if failed:
            raise RuntimeError("DALI could not decode the batch")
        if held[0]:
            sys.stderr.write(held[0])
            sys.stderr.flush()
        return _dali_to_torch(out, self.device)

    def decode(self, images: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        if len(images) == 0:
            raise ValueError("decode() needs at least one image")
        tensors, ok = [], []
        for start in range(0, len(images), self.max_batch_size):
            chunk = list(images[start: start + self.max_batch_size])
            arrays = [np.frombuffer(b, dtype=np.uint8) for b in chunk]
            try:
                tensors.append(self._run(arrays))
                ok.extend(range(start, start + len(chunk)))
                continue
            except RuntimeError:
                self._pipe = None  # a failed DALI pipeline is not reused
            good = []
            for i, b in enumerate(chunk):
                try:
                    decode_rgb_pil(b)
                    good.append(i)
                except Exception:
                    pass
            if good:
                tensors.append(self._run([arrays[i] for i in good]))
                ok.extend(start + i for i in good)
        if not tensors:
            return torch.empty(0, 3, self.spec.size, self.spec.size), []
        return torch.cat(tensors), ok


class PilImageDecoder:
    """The fallback with :class:`DaliImageDecoder`'s interface (corrupt images dropped)."""

    def __init__(self, spec: ImageSpec | None = None):
        self.spec = spec or ImageSpec()
        self._one = PilImageTransform(self.spec)

    def decode(self, images: Sequence[bytes]) -> tuple[torch.Tensor, list[int]]:
        if len(images) == 0:
            raise ValueError("decode() needs at least one image")
        tensors, ok = [], []
        for i, b in enumerate(images):
            try:
                tensors.append(self._one(b))
                ok.append(i)
            except Exception:
                continue
        if not tensors:
            return torch.empty(0, 3, self.spec.size, self.spec.size), []
        return torch.stack(tensors), ok


def make_image_decoder(backend: str = "auto", spec: ImageSpec | None = None, **dali_kwargs):
    """``"dali"``, ``"pil"`` or ``"auto"`` (DALI when installed, else PIL)."""
    if backend not in ("auto", "dali", "pil"):
        raise ValueError(f"image backend must be 'auto', 'dali' or 'pil', got {backend!r}")
    if backend == "dali" or (backend == "auto" and dali_available()):
        return DaliImageDecoder(spec, **dali_kwargs)
    return PilImageDecoder(spec)


class DaliWebdatasetLoader:
    """``fn.readers.webdataset`` over image shards → batches of normalised images and captions.

    The reader is sharded per rank (``shard_id``/``num_shards``); index files are written
    next to the shards (or into ``index_dir``) when missing, so DALI does not scan the tars.
    Each batch: ``{"image": [B, 3, size, size] float32, "caption": [str], "key": [str]}``.
    One iteration is one epoch of this rank's shard: the reader pads the last batch and the
    padding is dropped. As DALI readers do by default, each new epoch moves a rank on to the
    next shard, so over ``num_shards`` epochs every rank sees all the data. The shards must
    hold decodable images (DALI raises on a corrupt one); the mixed-task path
    (:class:`DaliImageDecoder`) is the one that skips corrupt samples.
    """

    def __init__(self, paths, *, batch_size: int, spec: ImageSpec | None = None,
                 shard_id: int = 0, num_shards: int = 1, shuffle: bool = False, seed: int = 0,
                 device: str = "auto", num_threads: int = 2, index_dir: str | None = None,
                 device_id: int | None = None):
        if not dali_available():
            raise ImportError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        from .webdataset_images import ensure_wds_indices, tar_shards

        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} not in [0, num_shards={num_shards})")
        self.paths = tar_shards(paths)
        self.index_paths = ensure_wds_indices(self.paths, index_dir)
        self.spec = spec or ImageSpec()
        self.device = _dali_device(device)
        self.batch_size = int(batch_size)
        if self.device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self._kw = dict(shard_id=shard_id, num_shards=num_shards, shuffle=shuffle, seed=seed,
                        num_threads=num_threads,
                        device_id=device_id if self.device == "gpu" else None)
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def

        kw = self._kw

        @pipeline_def(batch_size=self.batch_size, num_threads=kw["num_threads"],
                      device_id=kw["device_id"], seed=kw["seed"] if kw["seed"] >= 0 else -1)
        def pipe():
            jpg, txt = fn.readers.webdataset(
                paths=self.paths, index_paths=self.index_paths, ext=["jpg;jpeg;png", "txt"],
                missing_component_behavior="skip", shard_id=kw["shard_id"],
                num_shards=kw["num_shards"], random_shuffle=kw["shuffle"],
                pad_last_batch=True, name="webdataset_reader")
            info = fn.get_property(jpg, key="source_info")
            return _dali_image_graph(jpg, self.spec, self.device), txt, info

        p = pipe()
        p.build()
        return p

    def epoch_size(self) -> int:
        """Samples in this shard's part of one epoch."""
        if self._pipe is None:
            self._pipe = self._build()
        meta = self._pipe.reader_meta("webdataset_reader")
        total, shard, n = meta["epoch_size"], self._kw["shard_id"], self._kw["num_shards"]
        # DALI's shard boundaries: floor(total * i / n)
        return total * (shard + 1) // n - total * shard // n

    def __iter__(self):
        if self._pipe is None:
            self._pipe = self._build()
        remaining = self.epoch_size()
        while remaining > 0:
            images, txt, info = self._pipe.run()
            n = min(remaining, len(txt))  # the reader pads the last batch; drop the padding
            remaining -= n
            captions = [np.array(txt.at(i)).tobytes().decode("utf-8").strip() for i in range(n)]
            sources = [np.array(info.at(i)).tobytes().decode("utf-8") for i in range(n)]
            keys = [s.rsplit(":", 1)[-1].rsplit("/", 1)[-1].split(".", 1)[0] for s in sources]
            yield {"image": _dali_to_torch(images, self.device)[:n], "caption": captions,
                   "key": keys}
        self._pipe.reset()
