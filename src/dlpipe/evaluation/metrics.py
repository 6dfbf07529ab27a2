"""Classification metrics (scikit-learn where it has them) and inference latency."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
)

from dlpipe.data.tensors import Split
from dlpipe.training.runtime import Runtime


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_report(
    labels: np.ndarray, probs: np.ndarray, label_names: list[str], calibration_bins: int
) -> dict[str, Any]:
    """Test metrics: scalars for `dvc metrics`, plus per-class rows and the confusion matrix."""
    classes = list(range(len(label_names)))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0
    )
    return {
        "test_accuracy": float(accuracy_score(labels, predicted)),
        "test_macro_f1": float(f1_score(labels, predicted, average="macro", labels=classes)),
        "test_log_loss": float(log_loss(labels, probs, labels=classes)),
        "test_ece": expected_calibration_error(labels, probs, calibration_bins),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(label_names)
        ],
        "confusion": confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


@torch.no_grad()
def latency(
    model: torch.nn.Module, split: Split, runtime: Runtime, batch_size: int, repeats: int
) -> float:
    """Median wall time (ms) of one forward pass on `batch_size` test rows, after warm-up."""
    model.eval()
    index = torch.arange(min(batch_size, len(split)), device=split.labels.device)
    inputs, _ = split.batch(index)
    timings = []
    for step in range(repeats + 3):
        start = time.perf_counter()
        with runtime.autocast():
            model(*inputs)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            timings.append(time.perf_counter() - start)
    return statistics.median(timings) * 1000.0
