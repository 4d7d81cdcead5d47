"""Helpers of the IGLUE tests: files in IGLUE's formats and one-colour images."""

import json
import os

import pytest
from PIL import Image

RGB = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_intra_op_thread):
    """Tiny-model tests run on one intra-op thread (tests/conftest.py says why)."""


def write_lines(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def save_image(root, name, color, size=(40, 30)):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, RGB[color]).save(path)


def reranked(sim, match):
    """A RetrievalResult of similarity ``sim`` [images, captions] re-ranked by ``match``, as
    ``UniGen.retrieve`` returns with k = everything (for metrics checked by hand)."""
    from unigen.model.unigen_model import RetrievalResult

    def rank(s, m):
        top_sim, top = s.topk(s.shape[1], dim=1)
        order = m.gather(1, top).argsort(dim=1, descending=True)
        return top.gather(1, order), m.gather(1, top).gather(1, order), top_sim.gather(1, order)

    return RetrievalResult(*rank(sim, match), *rank(sim.t(), match.t()))
