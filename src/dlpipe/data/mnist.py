"""MNIST: decode the canonical IDX files, split, and store compact uint8 arrays plus a data card."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.config import PrepareMnistConfig
from dlpipe.data.splits import class_counts, stratified_split, stratified_subset
from dlpipe.errors import DlpipeError
from dlpipe.integrity import remove_manifest, write_manifest_of
from dlpipe.io import write_json_atomic, write_npz_atomic

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
NUM_CLASSES = 10
IMAGE_SIZE = 28  # pixels a side
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip or raw) as a uint8 array, its magic number and dimensions checked."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as err:
        raise DlpipeError(f"{path}: cannot read IDX file: {err}") from None
    if len(data) < 8:
        raise DlpipeError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (IMAGES_MAGIC, LABELS_MAGIC):
        raise DlpipeError(
            f"{path}: bad IDX magic {magic}, expected {IMAGES_MAGIC} or {LABELS_MAGIC}"
        )
    ndim = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * ndim
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if ndim == 3 and dims[1:] != [28, 28]:
        raise DlpipeError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DlpipeError(f"{path}: {len(data)} bytes, header says {expected} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def load_split(raw_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28] and labels [N] of one canonical split, cross-checked."""
    images_file, labels_file = FILES[split]
    images, labels = read_idx(raw_dir / images_file), read_idx(raw_dir / labels_file)
    if images.ndim != 3 or labels.ndim != 1:
        raise DlpipeError(f"{raw_dir}: {images_file} / {labels_file} are swapped or malformed")
    if len(images) != len(labels):
        raise DlpipeError(f"{raw_dir}: {len(images)} {split} images but {len(labels)} labels")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise DlpipeError(f"{raw_dir / labels_file}: label {labels.max()} outside 0-9")
    return images, labels


def _card(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    card: dict[str, Any] = {"num_classes": NUM_CLASSES, "image_shape": [IMAGE_SIZE, IMAGE_SIZE]}
    for name, (images, labels) in splits.items():
        card[name] = {
            "count": len(labels),
            "class_counts": class_counts(labels, NUM_CLASSES),
            "pixel_mean": round(float(images.mean(dtype=np.float64)) / 255.0, 4),
            "pixel_std": round(float(images.std(dtype=np.float64)) / 255.0, 4),
        }
    return card


def prepare(
    raw_dir: Path, out_dir: Path, card_path: Path, config: PrepareMnistConfig, seed: int
) -> dict[str, Any]:
    """Decode, split train into train/val, write `{train,val,test}.npz` and the data card."""
    train_x, train_y = load_split(raw_dir, "train")
    test_x, test_y = load_split(raw_dir, "test")
    sample = stratified_subset(train_y, config.max_train, seed)
    train_x, train_y = train_x[sample], train_y[sample]
    sample = stratified_subset(test_y, config.max_test, seed)
    test_x, test_y = test_x[sample], test_y[sample]
    keep, val = stratified_split(train_y, config.val_size, seed)
    splits = {
        "train": (train_x[keep], train_y[keep]),
        "val": (train_x[val], train_y[val]),
        "test": (test_x, test_y),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(out_dir)  # until the new one is written, the folder is incomplete
    for name, (images, labels) in splits.items():
        write_npz_atomic(out_dir / f"{name}.npz", images=images, labels=labels)
    label_names = [str(digit) for digit in range(NUM_CLASSES)]
    write_json_atomic(
        out_dir / "meta.json", {"num_classes": NUM_CLASSES, "label_names": label_names}
    )
    write_manifest_of(out_dir, [*(f"{name}.npz" for name in splits), "meta.json"])
    card = _card(splits)
    write_json_atomic(card_path, card)
    return card
