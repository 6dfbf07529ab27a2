"""The evaluate@<model> stage: the official test split, first touched here.

Writes DVC metrics and plots, logs `test_*` metrics and figures to the training's MLflow run,
logs the raw-input pyfunc model and registers it (alias `candidate`; `champion` only if better).
"""

from __future__ import annotations

import csv
import hashlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlpipe import lineage, paths
from dlpipe.config import Params, train_config
from dlpipe.errors import DlpipeError
from dlpipe.evaluation.figures import plot_confusion
from dlpipe.evaluation.metrics import classification_report, latency
from dlpipe.evaluation.paired import PREDICTIONS_FILE, write_predictions
from dlpipe.family import Family, load_trained
from dlpipe.integrity import read_verified
from dlpipe.io import atomic_path, read_json, write_json_atomic
from dlpipe.training.runtime import make_runtime
from dlpipe.training.trainer import predict_logits

if TYPE_CHECKING:
    from dlpipe.registry import SplitIdentity


def _write_csv(dest: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def most_confident_mistakes(
    labels: np.ndarray, probs: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the `count` wrong predictions with the highest confidence, and those."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    return order, confidence[order]


def split_identity(family: Family, dataset: str, params: Params) -> SplitIdentity:
    """The test rows scored: their number, a digest of their labels and of what identifies each
    row whatever its encoding (the input kind's `row_ids`), and whether they are the full split
    (no `max_test` sample). The registry compares only scores on the same rows."""
    from dlpipe.registry import SplitIdentity

    digest = hashlib.sha256()
    with np.load(paths.PREPARED_DIR / dataset / "test.npz", allow_pickle=False) as arrays:
        for key in ("labels", *family.inputs.row_ids):
            digest.update(key.encode())
            digest.update(np.ascontiguousarray(arrays[key]).tobytes())
        rows = len(arrays["labels"])
    max_test = params.datasets[dataset].model_dump().get("max_test", 0)
    return SplitIdentity(rows, digest.hexdigest()[:16], max_test == 0)


def _log_to_mlflow(
    name: str, family: Family, params: Params, scalars: dict[str, float], figures: list[Path]
) -> dict[str, Any]:
    """Reopen the training's run, log test results, the raw-input model, and register it.

    Returns the registry decision; any failure is one DlpipeError line."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from dlpipe import registry, serving
    from dlpipe.tracking import spool, store
    from dlpipe.tracking.run import StageRun

    model_dir = paths.MODELS_DIR / name
    if (model_dir / "mlflow_run.json").is_file():  # the run to log to: checked like the model
        read_verified(model_dir / "mlflow_run.json", f"dvc repro train@{name}", required=False)
    info = read_json(model_dir / "mlflow_run.json")
    run_id = info.get("run_id")
    if not run_id:
        raise DlpipeError("the training ran without MLflow tracking: there is no run to log to")
    uri = store.recorded_store(info.get("tracking_uri"), str(model_dir / "mlflow_run.json"), run_id)
    run = StageRun(uri, True, True, params.mlflow.orphan_after_s)
    for line in spool.sync(run_id):  # metrics the training could not deliver come first
        print(f"evaluate@{name}: {line}")
    run.reopen(run_id)
    try:
        run.call("tag lineage", mlflow.set_tags, lineage.train_stage_tags(name))
        run.log_metrics(scalars)
        for figure in figures:
            run.log_artifact(figure)
        model_uri = run.call("log raw-input model", serving.log_raw_input_model, model_dir)
        if not params.registry.enabled:
            return {"registered": False, "reason": "registry.enabled is false"}
        decision = run.call(
            "register model",
            registry.register_and_promote,
            name,
            model_uri,
            run_id,
            scalars,
            params.registry,
            MlflowClient(run.uri),
            split_identity(family, train_config(params, name).dataset, params),
        )
        return {"registered": True, **decision}
    finally:
        run.end("FINISHED")  # the training's run: its status is the training's


def register(
    name: str, family: Family, params: Params, scalars: dict[str, float], figures: list[Path]
) -> dict[str, Any]:
    """The registry decision, written to registry.json. When MLflow fails the stage fails (so DVC
    never takes an unregistered model for a finished evaluation) unless tracking is optional."""
    record = paths.MODEL_REPORTS_DIR / name / "registry.json"
    record.unlink(missing_ok=True)  # never a stale decision beside the new results
    try:
        decision = _log_to_mlflow(name, family, params, scalars, figures)
    except DlpipeError as err:
        what = f"evaluate@{name}: {err}; the model is not registered (results: {record.parent})"
        if params.mlflow.require_tracking:
            raise DlpipeError(
                f"{what}; rerun once MLflow works, or set mlflow.require_tracking: false"
            ) from None
        print(f"warning: {what}; mlflow.require_tracking is false", file=sys.stderr)
        decision = {"registered": False, "reason": str(err)}
    write_json_atomic(record, decision)
    return decision


def evaluate(name: str, params: Params) -> dict[str, Any]:
    config = params.evaluate
    model, info, family = load_trained(paths.MODELS_DIR / name)
    label_names = [str(label) for label in info["data"]["label_names"]]
    training = train_config(params, name)
    runtime = make_runtime(training.device, training.precision, cpu_bf16=family.cpu_bf16)
    model = family.inputs.place(model, runtime.device)
    dataset = training.dataset
    prepared = paths.PREPARED_DIR / dataset
    test = family.inputs.load_split(prepared, "test", runtime.device)

    logits = predict_logits(model, test, runtime, training.eval_batch_size)
    probs = torch.softmax(logits, dim=1).cpu().numpy()
    labels = test.labels.cpu().numpy()
    report = classification_report(labels, probs, label_names, config.calibration_bins)
    scalars: dict[str, float] = {
        key: round(value, 6) for key, value in report.items() if key.startswith("test_")
    }
    for batch_size in config.latency_batch_sizes:
        ms = latency(model, test, runtime, batch_size, config.latency_repeats)
        scalars[f"latency_b{batch_size}_ms"] = round(ms, 3)
        scalars[f"throughput_b{batch_size}_per_s"] = round(batch_size / ms * 1000.0, 1)
    scalars["parameters"] = sum(p.numel() for p in model.parameters())
    scalars["model_size_mb"] = round(
        (paths.MODELS_DIR / name / "model.pt").stat().st_size / 2**20, 3
    )

    reports = paths.MODEL_REPORTS_DIR / name
    predicted = probs.argmax(1)
    write_predictions(reports / PREDICTIONS_FILE, labels, predicted, label_names)
    _write_csv(reports / "per_class.csv", report["per_class"])
    confusion_png = reports / "confusion_matrix.png"
    title = f"{name} on the {dataset} test split"
    plot_confusion(report["confusion"], label_names, title, confusion_png)
    rows, confidence = most_confident_mistakes(labels, probs, config.mistakes_shown)
    mistakes = reports / "mistakes" / family.inputs.mistakes_file
    family.inputs.write_mistakes(
        mistakes,
        test,
        rows,
        [label_names[i] for i in labels[rows]],
        [label_names[i] for i in predicted[rows]],
        confidence,
        prepared,
    )

    result = {**scalars, "device": runtime.device_name}
    write_json_atomic(reports / "eval.json", result)  # local results first: MLflow may fail
    decision = register(name, family, params, scalars, [confusion_png, mistakes])
    return {**result, "registry": decision}
