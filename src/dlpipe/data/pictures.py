"""Labelled pictures -> prepared image splits: uint8 [N, C, H, W] arrays, a meta.json and a data
card. Every image format (a built-in, a user's image folder) ends here."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data.splits import class_counts
from dlpipe.integrity import remove_manifest, write_manifest_of
from dlpipe.io import write_json_atomic, write_npz_atomic


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 [N, C, H, W] images, on the 0-1 scale."""
    mean = images.mean(axis=(0, 2, 3), dtype=np.float64) / 255.0
    std = images.std(axis=(0, 2, 3), dtype=np.float64) / 255.0
    return [round(float(v), 4) for v in mean], [round(max(float(v), 1e-3), 4) for v in std]


def prepare_images(
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    label_names: Sequence[str],
    out_dir: Path,
    raw_input: str,
    norm: tuple[Sequence[float], Sequence[float]] | None = None,
    card_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `{train,val,test}.npz` (images uint8 [N, C, H, W], labels) and meta.json; return the
    data card. The models normalise by `norm` (mean, std per channel), by default the training
    split's own; `raw_input` says how served pictures are read (dlpipe.inputs.images)."""
    train_images = splits["train"][0]
    channels, height, width = (int(v) for v in train_images.shape[1:])
    mean, std = norm if norm is not None else channel_stats(train_images)
    num_classes = len(label_names)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(out_dir)  # until the new one is written, the folder is incomplete
    for name, (images, labels) in splits.items():
        write_npz_atomic(out_dir / f"{name}.npz", images=images, labels=labels.astype(np.int64))
    image = {
        "channels": channels,
        "height": height,
        "width": width,
        "mean": list(mean),
        "std": list(std),
        "raw": raw_input,
    }
    meta = {
        "inputs": "images",
        "dataset": out_dir.name,
        "num_classes": num_classes,
        "label_names": list(label_names),
        "image": image,
    }
    write_json_atomic(out_dir / "meta.json", meta)
    write_manifest_of(out_dir, [*(f"{name}.npz" for name in splits), "meta.json"])
    card: dict[str, Any] = {
        "num_classes": num_classes,
        "label_names": list(label_names),
        "image_shape": [channels, height, width],
        **(card_extra or {}),
    }
    for name, (images, labels) in splits.items():
        split_mean, split_std = channel_stats(images) if len(images) else ([], [])
        card[name] = {
            "count": len(labels),
            "class_counts": class_counts(labels, num_classes),
            "pixel_mean": split_mean,
            "pixel_std": split_std,
        }
    return card
