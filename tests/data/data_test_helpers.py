"""Small file writers shared by the data tests (imported by name: conftest puts this folder
on sys.path, because pytest's importlib mode does not)."""

import io
import json
import tarfile

import numpy as np


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful image (gradients + blobs): JPEG-friendly, resize-sensitive."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    chans = []
    for c in range(3):
        a, b, p = rng.uniform(1, 4, size=3)
        chans.append(0.5 + 0.5 * np.sin(2 * np.pi * (a * x + b * y) + p))
    return (np.stack(chans, -1) * 255).round().astype(np.uint8)


def write_tar(path, members):
    """members: list of (name, bytes)."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return str(path)
