"""A user's own data, made up: colour pictures of four classes, and support tickets of five
topics (the `images` and `table` formats' tests and the own-data pipeline tests)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

CLASSES = ("cat", "dog", "fish", "owl")
COLOURS = {"cat": (220, 40, 40), "dog": (40, 200, 40), "fish": (40, 40, 220), "owl": (230, 220, 30)}


def picture(colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> Image.Image:
    """Noise around a square of the class's colour, at a random place."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top : top + height // 2, left : left + width // 2] = colour
    return Image.fromarray(pixels, "RGB")


TOPICS = {
    "billing": ["invoice", "charged", "payment"],
    "login": ["password", "locked", "signin"],
    "shipping": ["parcel", "delivery", "courier"],
    "refund": ["refund", "money", "return"],
    "bug": ["crash", "error", "broken"],
}
FILLER = [
    "please",
    "help",
    "my",
    "account",
    "the",
    "order",
    "today",
    "again",
    "thanks",
    "hello",
    "team",
]


def tickets(n_per_class: int = 12, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for topic, words in TOPICS.items():
        for i in range(n_per_class):
            text = " ".join([*rng.choice(FILLER, 6), words[i % 3], *rng.choice(FILLER, 3)])
            rows.append({"id": f"{topic}-{i}", "body": f"{text} #{i}", "category": topic})
    return pd.DataFrame(rows)
