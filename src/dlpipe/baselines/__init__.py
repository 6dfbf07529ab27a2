"""The linear yardstick beside the deep models of each dataset, fit with scikit-learn.

One per input kind, `dlpipe/baselines/<inputs>.py` (`fit(params, prepared_dir)`): TF-IDF word
n-grams + logistic regression for texts, logistic regression on the pixels for images. Each is
fit on exactly the training rows the deep models train on and scored on the same test rows, so
the report can say how many points each deep model buys over a model that trains in seconds. It
is logged to MLflow as its own run in the same experiment (tag baseline=true).
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dlpipe import paths
from dlpipe.config import Params
from dlpipe.errors import DlpipeError
from dlpipe.evaluation.metrics import classification_report
from dlpipe.io import read_json, write_json_atomic


def train_and_evaluate(params: Params, dataset: str) -> dict[str, Any]:
    """Fit the dataset's yardstick on train, score val and test; write
    reports/baselines/<dataset>/eval.json; log to MLflow. Returns what eval.json holds."""
    if dataset not in params.datasets:
        raise DlpipeError(
            f"unknown dataset {dataset!r}; params.yaml declares: {', '.join(params.datasets)}"
        )
    prepared = paths.PREPARED_DIR / dataset
    meta = read_json(prepared / "meta.json")
    kind = importlib.import_module(f"dlpipe.baselines.{meta['inputs']}")
    fitted = kind.fit(params, prepared)
    label_names = [str(n) for n in meta["label_names"]]
    report = classification_report(
        fitted.test_labels,
        fitted.test_probs,
        label_names,
        params.evaluate.calibration_bins,
    )
    result = {
        "model": kind.NAME,
        "dataset": dataset,
        **{k: round(v, 6) for k, v in report.items() if k.startswith("test_")},
        "val_accuracy": round(float((fitted.val_probs.argmax(1) == fitted.val_labels).mean()), 6),
        "train_time_s": round(fitted.seconds, 2),
        "features": fitted.features,
        "train_rows": fitted.train_rows,
        "test_rows": len(fitted.test_labels),
        "device": "CPU (scikit-learn)",
    }
    write_json_atomic(paths.REPORTS_DIR / "baselines" / dataset / "eval.json", result)
    _log_run(params, result, kind.NAME, meta["inputs"])
    return result


class Fitted:
    """A yardstick fitted on (train_x, train_y): its probabilities on val and test with their
    labels, its number of features and its fitting time."""

    def __init__(
        self,
        model: Any,
        train: tuple[Any, np.ndarray],
        val: tuple[Any, np.ndarray],
        test: tuple[Any, np.ndarray],
        features: Callable[[Any], int],
    ) -> None:
        start = time.perf_counter()
        model.fit(*train)
        self.seconds = time.perf_counter() - start
        self.val_probs, self.val_labels = model.predict_proba(val[0]), val[1]
        self.test_probs, self.test_labels = model.predict_proba(test[0]), test[1]
        self.features, self.train_rows = features(model), len(train[1])


def _log_run(params: Params, result: dict[str, Any], name: str, inputs: str) -> None:
    from dlpipe.tracking import TrainingRun, flatten, git_state, tracking_uri

    run = TrainingRun(tracking_uri(), params.mlflow.require_tracking)
    tags = {
        "model": f"baseline@{result['dataset']}",
        "model_family": name,
        "baseline": "true",
        "dataset": result["dataset"],
        **git_state(),
    }
    run.start(
        params.mlflow.experiment,
        f"{name}-{result['dataset']}-{git_state()['git_sha'][:7]}",
        None,
        tags,
        {
            "seed": params.seed,
            "model.family": name,
            "data.name": result["dataset"],
            **flatten("baseline", getattr(params.baseline, inputs).model_dump()),
        },
        params.mlflow.system_metrics_interval_s,
    )
    numbers = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    run.log_metrics(numbers)
    run.end("FINISHED")
