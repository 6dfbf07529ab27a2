"""Seeded, stratified splits: the same seed gives the same rows on any machine."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dlpipe.errors import DlpipeError


def rows_of(size: int | float, total: int) -> int:
    """A split size as a row count: a count as it is, a share (0 < share < 1) of `total`."""
    return size if isinstance(size, int) else max(1, round(size * total))


def stratified_split(
    labels: np.ndarray,
    size: int | float,
    seed: int,
    label_names: Sequence[str] | None = None,
    what: str = "val_size",
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the kept rows and of `size` held-out rows (a count or a share), both
    with every class in proportion. Too few rows of a class is one DlpipeError line naming it."""
    held = rows_of(size, len(labels))
    if not 0 < held < len(labels):
        raise DlpipeError(f"{what} {size} must leave rows on both sides of {len(labels)} rows")
    counts = np.bincount(labels.astype(np.int64))
    present = np.flatnonzero(counts)
    if len(present) < 2:
        raise DlpipeError(f"cannot split {len(labels)} rows by {what}: they hold one class only")
    rarest = int(present[np.argmin(counts[present])])
    if counts[rarest] < 2 or held < len(present) or len(labels) - held < len(present):
        name = label_names[rarest] if label_names is not None else str(rarest)
        raise DlpipeError(
            f"cannot split {len(labels)} rows by {what} {size}: class {name!r} has "
            f"{counts[rarest]} example(s), and each side needs one of every class "
            f"({len(present)} classes)"
        )
    # Imported here, not at the top: only prepare splits, and importing scikit-learn's
    # model_selection would slow the start of every train stage, which imports this module.
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train_idx, val_idx = train_test_split(index, test_size=held, random_state=seed, stratify=labels)
    return np.sort(train_idx), np.sort(val_idx)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(labels.astype(np.int64), minlength=num_classes)]


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded stratified sample of `size` rows; all rows when size is 0."""
    if size == 0 or size >= len(labels):
        return np.arange(len(labels))
    _, chosen = stratified_split(labels, size, seed, what="max_train/max_test")
    return chosen
