"""Two classifiers scored on the same test rows, compared row by row.

Every model's test predictions are kept as `confusion.csv` (one `actual,predicted` row per test
row, in the prepared split's order: the table DVC's confusion template plots). Two such files of
one dataset pair up, and McNemar's exact test asks whether the rows only one of the two models gets
right split unevenly enough to tell the models apart, which a difference in accuracy alone does
not say: on 25,000 reviews, 0.05 points is 12 reviews.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from dlpipe.io import atomic_path

PREDICTIONS_FILE = "confusion.csv"
SIGNIFICANCE = 0.05  # p below this: the two models' accuracies differ beyond chance


def write_predictions(
    dest: Path, labels: np.ndarray, predicted: np.ndarray, label_names: Sequence[str]
) -> None:
    """One `actual,predicted` row (class names) per test row, in the split's order."""
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        pairs = zip(labels, predicted, strict=True)
        writer.writerows((label_names[a], label_names[p]) for a, p in pairs)


def read_predictions(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The (actual, predicted) columns of a predictions file; None when there is none."""
    if not path.is_file():
        return None
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or rows[0] != ["actual", "predicted"]:
        return None
    table = np.array(rows[1:], dtype=str).reshape(-1, 2)
    return table[:, 0], table[:, 1]


@dataclass(frozen=True)
class Paired:
    """Rows only model a gets right, rows only model b gets right, and McNemar's exact p-value
    (two-sided: how likely a split at least this uneven is if both models were as accurate)."""

    only_a: int
    only_b: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANCE


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> Paired:
    """McNemar's exact test on two boolean arrays of the same rows (True: that model is right)."""
    only_a = int(np.sum(a_right & ~b_right))
    only_b = int(np.sum(b_right & ~a_right))
    disagree = only_a + only_b
    p_value = binomtest(only_a, disagree, 0.5).pvalue if disagree else 1.0
    return Paired(only_a, only_b, float(p_value))


def compare_files(a: Path, b: Path) -> Paired | None:
    """McNemar's test of two predictions files; None unless both exist and score the same rows
    (the same actual classes, row by row)."""
    first, second = read_predictions(a), read_predictions(b)
    if first is None or second is None or not np.array_equal(first[0], second[0]):
        return None
    return mcnemar(first[0] == first[1], second[0] == second[1])
