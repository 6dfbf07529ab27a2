"""The evaluate@<model> stage: the official test split, first touched here.

Writes DVC metrics and plots, logs `test_*` metrics and figures to the training's MLflow run,
logs the raw-input pyfunc model and registers it (alias `candidate`; `champion` only if better).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from dlpipe import paths
from dlpipe.config import DATASET_OF_MODEL, Params
from dlpipe.data.tensors import Split, load_split
from dlpipe.evaluation.figures import mistakes_markdown, plot_confusion, plot_misclassified
from dlpipe.evaluation.metrics import classification_report, latency
from dlpipe.io import atomic_path, read_json, write_json_atomic
from dlpipe.models import load_trained
from dlpipe.training.runtime import make_runtime
from dlpipe.training.trainer import predict_logits


def _write_csv(dest: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _most_confident_mistakes(
    labels: np.ndarray, probs: np.ndarray, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the `count` wrong predictions with the highest confidence, and those."""
    predicted, confidence = probs.argmax(1), probs.max(1)
    wrong = np.flatnonzero(predicted != labels)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
    return order, confidence[order]


def _mistake_figure(
    name: str, split: Split, labels: np.ndarray, probs: np.ndarray, names: list[str], count: int
) -> Path:
    reports = paths.REPORTS_DIR / name
    rows, confidence = _most_confident_mistakes(labels, probs, count)
    predicted = probs.argmax(1)
    if not split.is_text:
        dest = reports / "mistakes.png"
        images = split.features["images"][torch.from_numpy(rows)].cpu().numpy()
        plot_misclassified(
            images,
            np.array(names)[labels[rows]],
            np.array(names)[predicted[rows]],
            confidence,
            dest,
        )
        return dest
    dest = reports / "mistakes.md"
    prepared = paths.PREPARED_DIR / DATASET_OF_MODEL[name]
    with np.load(prepared / "test.npz") as arrays:
        review_ids = arrays["review_id"][rows]
    raw = pd.read_parquet(paths.RAW_DIR / "imdb" / "test.parquet", columns=["review_id", "text"])
    texts = raw.set_index("review_id").loc[review_ids, "text"]
    table = [
        {
            "text": str(text),
            "actual": names[labels[row]],
            "predicted": names[predicted[row]],
            "confidence": f"{conf:.1%}",
        }
        for row, text, conf in zip(rows, texts, confidence, strict=True)
    ]
    mistakes_markdown(table, dest)
    return dest


def _log_to_mlflow(
    name: str, params: Params, scalars: dict[str, float], figures: list[Path]
) -> dict[str, Any] | None:
    """Reopen the training's run, log test results, the raw-input model, and register it."""
    from dlpipe import registry, serving, tracking

    info = read_json(paths.MODELS_DIR / name / "mlflow_run.json")
    run_id = info.get("run_id")
    if not run_id:
        print(f"evaluate@{name}: training ran without MLflow; nothing logged", file=sys.stderr)
        return None
    run = tracking.TrainingRun(info.get("tracking_uri") or tracking.tracking_uri(), True)
    run.reopen(run_id)
    run.log_metrics(scalars)
    for figure in figures:
        run.log_artifact(figure)
    dataset = DATASET_OF_MODEL[name]
    tokenizer = paths.PREPARED_DIR / dataset / "tokenizer.json" if dataset == "imdb" else None
    model_uri = run.call(
        "log raw-input model", serving.log_raw_input_model, paths.MODELS_DIR / name, tokenizer
    )
    decision = None
    if params.registry.enabled and model_uri:
        decision = run.call(
            "register model",
            registry.register_and_promote,
            name,
            model_uri,
            run_id,
            scalars,
            params.registry,
            tracking.MlflowClient(run.uri),
        )
    run.end("FINISHED")
    return decision


def evaluate(name: str, params: Params) -> dict[str, Any]:
    config = params.evaluate
    dataset = DATASET_OF_MODEL[name]
    model, info = load_trained(paths.MODELS_DIR / name)
    label_names = list(info["data"]["label_names"])
    runtime = make_runtime(
        getattr(params.train, name).device, getattr(params.train, name).precision
    )
    model = model.to(runtime.device)
    channels_last = name == "cnn" and runtime.device.type != "mps"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    test = load_split(paths.PREPARED_DIR / dataset, "test", channels_last).to(runtime.device)

    eval_batch = getattr(params.train, name).eval_batch_size
    probs = torch.softmax(predict_logits(model, test, runtime, eval_batch), dim=1).cpu().numpy()
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

    reports = paths.REPORTS_DIR / name
    predicted = probs.argmax(1)
    _write_csv(
        reports / "confusion.csv",
        [
            {"actual": label_names[a], "predicted": label_names[p]}
            for a, p in zip(labels, predicted, strict=True)
        ],
    )
    _write_csv(reports / "per_class.csv", report["per_class"])
    confusion_png = reports / "confusion_matrix.png"
    plot_confusion(
        report["confusion"], label_names, f"{name} on the {dataset} test split", confusion_png
    )
    mistakes = _mistake_figure(name, test, labels, probs, label_names, config.mistakes_shown)

    result = {**scalars, "device": runtime.device_name}
    write_json_atomic(reports / "eval.json", result)  # local results first: MLflow may fail
    decision = _log_to_mlflow(name, params, scalars, [confusion_png, mistakes])
    write_json_atomic(reports / "registry.json", decision or {"registered": False})
    return {**result, "registry": decision}
