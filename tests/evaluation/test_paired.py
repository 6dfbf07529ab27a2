"""Two models on the same test rows: the predictions files and McNemar's exact test, and the
report's verdict on each deep model against the best linear model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlpipe.evaluation.paired import compare_files, mcnemar, read_predictions, write_predictions
from dlpipe.report import _linear_lines

NAMES = ["negative", "positive"]


def test_mcnemar_by_hand() -> None:
    # 10 rows only a gets right, none only b: p = 2 * 0.5**10 (two-sided exact binomial).
    a = np.array([True] * 10 + [True] * 5 + [False] * 3)
    b = np.array([False] * 10 + [True] * 5 + [False] * 3)
    paired = mcnemar(a, b)
    assert (paired.only_a, paired.only_b) == (10, 0)
    assert paired.p_value == pytest.approx(2 * 0.5**10)
    assert paired.significant
    # an even split of the disagreements is no evidence at all; agreement everywhere neither
    assert mcnemar(np.array([True, False]), np.array([False, True])).p_value == 1.0
    assert mcnemar(a, a) == type(paired)(0, 0, 1.0)
    assert not mcnemar(a, a).significant


def test_predictions_round_trip_in_row_order(tmp_path: Path) -> None:
    dest = tmp_path / "m" / "confusion.csv"
    write_predictions(dest, np.array([1, 0, 1]), np.array([1, 1, 0]), NAMES)
    assert dest.read_text().splitlines() == [
        "actual,predicted",
        "positive,positive",
        "negative,positive",
        "positive,negative",
    ]
    actual, predicted = read_predictions(dest)  # type: ignore[misc]
    assert actual.tolist() == ["positive", "negative", "positive"]
    assert predicted.tolist() == ["positive", "positive", "negative"]
    assert read_predictions(tmp_path / "missing.csv") is None


def test_only_files_of_the_same_rows_are_paired(tmp_path: Path) -> None:
    labels = np.array([0, 1, 1, 0])
    write_predictions(tmp_path / "a.csv", labels, np.array([0, 1, 1, 0]), NAMES)
    write_predictions(tmp_path / "b.csv", labels, np.array([1, 1, 0, 0]), NAMES)
    shuffled = labels[[1, 0, 2, 3]]  # the same classes, other rows
    write_predictions(tmp_path / "other.csv", shuffled, shuffled, NAMES)
    paired = compare_files(tmp_path / "a.csv", tmp_path / "b.csv")
    assert paired is not None and (paired.only_a, paired.only_b) == (2, 0)
    assert compare_files(tmp_path / "a.csv", tmp_path / "other.csv") is None
    assert compare_files(tmp_path / "a.csv", tmp_path / "missing.csv") is None


def write_model(reports: Path, name: str, labels: np.ndarray, predicted: np.ndarray) -> dict:
    write_predictions(reports / "models" / name / "confusion.csv", labels, predicted, NAMES)
    return {"test_accuracy": float((labels == predicted).mean())}


def test_the_report_says_whether_a_deep_model_beats_the_best_linear_model_beyond_chance(
    tmp_path: Path,
) -> None:
    """On 2,000 rows: one model right on 60 more rows than the linear model (60 against 0
    disagreements: significant), one right on 2 more (21 against 19: a tie, though its accuracy
    is higher), and a model without a predictions file (the verdict by accuracy alone)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    linear = labels.copy()
    linear[:100] = 1 - linear[:100]  # the linear model misses rows 0-99
    strong = labels.copy()
    strong[60:100] = 1 - strong[60:100]  # right on rows 0-59 too
    close = labels.copy()
    close[:100] = 1 - close[:100]
    close[:21] = labels[:21]  # right on 21 of the linear model's misses...
    close[200:219] = 1 - close[200:219]  # ...and wrong on 19 rows it gets right
    write_predictions(
        tmp_path / "linear" / "imdb" / "nbsvm" / "confusion.csv", labels, linear, NAMES
    )
    fitted = {
        "nbsvm": {"model": "nbsvm", "test_accuracy": 0.95, "train_time_s": 2.0},
        "tfidf_logreg": {"model": "tfidf_logreg", "test_accuracy": 0.94, "train_time_s": 1.0},
    }
    results = {
        name: ({"dataset": "imdb", "train_time_s": 20.0}, evaluation)
        for name, evaluation in (
            ("strong", write_model(tmp_path, "strong", labels, strong)),
            ("close", write_model(tmp_path, "close", labels, close)),
            ("unpaired", {"test_accuracy": 0.96}),
        )
    }
    lines = _linear_lines({"imdb": fitted}, results, tmp_path)
    text = "\n".join(lines)
    assert "## imdb: against the best linear model (nbsvm)" in text
    strong_line, close_line, unpaired_line = (
        next(line for line in lines if line.startswith(f"- {name} ")) for name in results
    )
    assert strong_line.startswith("- strong beats it: +3.00 points of test accuracy over nbsvm")
    assert "(significant: 60 test rows only strong gets right, 0 only nbsvm; McNemar p = " in (
        strong_line
    )
    assert close_line.startswith("- close ties it: +0.10 points of test accuracy over nbsvm")
    assert "(not significant: 21 test rows only close gets right, 19 only nbsvm;" in close_line
    assert unpaired_line == (
        "- unpaired beats it: +1.00 points of test accuracy over nbsvm, 10x its training time"
    )
