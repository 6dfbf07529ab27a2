"""The linear models fit beside the deep ones on every dataset: the yardsticks a deep model must
beat to be worth its cost.

One module per linear model, `dlpipe/linear/<name>.py`, declaring `NAME`, the `INPUTS` kind it
reads and `fit(params, prepared_dir) -> Fitted`: TF-IDF word n-grams + logistic regression and
NBSVM for texts, logistic regression on the pixels for images. Each is fit on exactly the
training rows the deep models train on and scored on the same test rows, so the report can say
how many points each deep model buys over the best of them and, from each one's test predictions
(reports/linear/<dataset>/<name>/confusion.csv), whether the difference is beyond chance. Each is
logged to MLflow as its own run, `<name>@<dataset>`, in the same experiment (tag linear=true).
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from dlpipe import paths
from dlpipe.config import Params
from dlpipe.errors import DlpipeError
from dlpipe.evaluation.metrics import classification_report
from dlpipe.evaluation.paired import PREDICTIONS_FILE, write_predictions
from dlpipe.io import read_json, write_json_atomic


def models_for(inputs: str) -> list[ModuleType]:
    """The linear models that read `inputs` ("tokens", "images"), by name."""
    found = [
        importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)
    ]
    return sorted((m for m in found if getattr(m, "INPUTS", None) == inputs), key=lambda m: m.NAME)


def run_name(model: str, dataset: str) -> str:
    """How `dlpipe compare`, the report and MLflow's `model` tag name a linear model's run."""
    return f"{model}@{dataset}"


def fit_and_evaluate(params: Params, dataset: str) -> dict[str, dict[str, Any]]:
    """Fit each linear model of the dataset's input kind on train, score val and test; write its
    test predictions, then reports/linear/<dataset>.json (model name -> results) once all are
    done; log each to MLflow. Returns what the file holds."""
    if dataset not in params.datasets:
        raise DlpipeError(
            f"unknown dataset {dataset!r}; params.yaml declares: {', '.join(params.datasets)}"
        )
    prepared = paths.PREPARED_DIR / dataset
    meta = read_json(prepared / "meta.json")
    label_names = [str(n) for n in meta["label_names"]]
    results = {}
    for model in models_for(meta["inputs"]):
        fitted = model.fit(params, prepared)
        report = classification_report(
            fitted.test_labels, fitted.test_probs, label_names, params.evaluate.calibration_bins
        )
        val_accuracy = float((fitted.val_probs.argmax(1) == fitted.val_labels).mean())
        write_predictions(
            paths.REPORTS_DIR / "linear" / dataset / model.NAME / PREDICTIONS_FILE,
            fitted.test_labels,
            fitted.test_probs.argmax(1),
            label_names,
        )
        results[model.NAME] = {
            "model": model.NAME,
            "dataset": dataset,
            **{k: round(v, 6) for k, v in report.items() if k.startswith("test_")},
            "val_accuracy": round(val_accuracy, 6),
            "train_time_s": round(fitted.seconds, 2),
            "features": fitted.features,
            "train_rows": fitted.train_rows,
            "test_rows": len(fitted.test_labels),
            "device": "CPU (scikit-learn)",
        }
        print(
            f"linear@{dataset}: {model.NAME} test_accuracy {report['test_accuracy']:.4f}, "
            f"val_accuracy {val_accuracy:.4f}, fit {fitted.seconds:.1f}s, "
            f"{fitted.features:,} features"
        )
    write_json_atomic(paths.REPORTS_DIR / "linear" / f"{dataset}.json", results)
    for name, result in results.items():
        _log_run(params, result, name)
    return results


class Fitted:
    """A linear model fitted on (train_x, train_y): its probabilities on val and test with their
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


def _log_run(params: Params, result: dict[str, Any], name: str) -> None:
    from dlpipe.config import flatten
    from dlpipe.lineage import git_state
    from dlpipe.tracking.run import StageRun
    from dlpipe.tracking.store import tracking_uri

    dataset = result["dataset"]
    run = StageRun(
        tracking_uri(), params.mlflow.require_tracking, orphan_after_s=params.mlflow.orphan_after_s
    )
    tags = {
        "model": run_name(name, dataset),
        "model_family": name,
        "linear": "true",
        "dataset": dataset,
        "dvc_stage": f"linear@{dataset}",
        **git_state(),
    }
    run.start(
        params.mlflow.experiment,
        f"{name}-{dataset}-{git_state()['git_sha'][:7]}",
        None,
        tags,
        {
            "seed": params.seed,
            "model.family": name,
            "data.name": dataset,
            **flatten(f"linear.{name}", getattr(params.linear, name).model_dump()),
        },
        params.mlflow.system_metrics_interval_s,
    )
    numbers = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    run.log_metrics(numbers)
    run.end("FINISHED")
