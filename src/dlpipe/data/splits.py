"""Seeded, stratified train/validation splits: the same seed gives the same rows on any machine."""

from __future__ import annotations

import numpy as np

from dlpipe.errors import DlpipeError


def stratified_split(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the kept training rows and of the validation rows."""
    if not 0 < val_size < len(labels):
        raise DlpipeError(f"val_size {val_size} must be between 1 and {len(labels) - 1}")
    # Imported here, not at the top: only prepare splits, and scikit-learn's model_selection
    # costs every train stage, which imports this module, 1 s of start-up.
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        train_idx, val_idx = train_test_split(
            index, test_size=val_size, random_state=seed, stratify=labels
        )
    except ValueError as err:
        raise DlpipeError(f"cannot split {len(labels)} rows stratified: {err}") from None
    return np.sort(train_idx), np.sort(val_idx)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels.astype(np.int64), minlength=num_classes)]


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified sample of `size` rows; all rows when size is 0."""
    if size == 0 or size >= len(labels):
        return np.arange(len(labels))
    _, chosen = stratified_split(labels, size, seed)
    return chosen
