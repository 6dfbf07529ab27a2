"""The linear baseline beside the deep text models: TF-IDF word n-grams + logistic regression.

Trained with scikit-learn on exactly the reviews the text families train on (the prepared train
split's review ids) and scored on the same test rows, so the report can say how many points the
RNN and the Transformer buy over a model that trains in seconds. It is logged to MLflow as its own
run in the same experiment (tag model_family=tfidf_logreg, baseline=true).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dlpipe import paths
from dlpipe.config import BaselineConfig, Params
from dlpipe.errors import DlpipeError
from dlpipe.evaluation.metrics import classification_report
from dlpipe.integrity import read_verified
from dlpipe.io import read_json, write_json_atomic

NAME = "tfidf_logreg"
DATASET = "imdb"


def split_texts(raw_dir: Path, prepared_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """The raw reviews of a prepared split, in its row order, with its labels."""
    path = prepared_dir / f"{split}.npz"
    if not path.is_file():
        raise DlpipeError(f"{path}: missing; run `dvc repro prepare@{DATASET}` first")
    with np.load(io.BytesIO(read_verified(path, f"dvc repro prepare@{DATASET}"))) as arrays:
        if "review_id" not in arrays:
            raise DlpipeError(f"{path}: no review ids; rerun `dvc repro prepare@{DATASET}`")
        ids, labels = arrays["review_id"], arrays["labels"].astype(np.int64)
    source = "test" if split == "test" else "train"  # val is held out of the train reviews
    raw = pd.read_parquet(raw_dir / f"{source}.parquet", columns=["review_id", "text"])
    texts = raw.set_index("review_id").loc[ids, "text"].str.replace("<br />", " ", regex=False)
    return texts.tolist(), labels


def make_model(config: BaselineConfig, seed: int) -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(
        TfidfVectorizer(
            ngram_range=(1, config.ngram_max),
            min_df=config.min_df,
            sublinear_tf=config.sublinear_tf,
            dtype=np.float32,
        ),
        LogisticRegression(C=config.C, max_iter=config.max_iter, random_state=seed),
    )


def train_and_evaluate(params: Params) -> dict[str, Any]:
    """Fit on train, score val and test; write reports/baselines/<name>/eval.json; log to
    MLflow. Returns what eval.json holds."""
    config = params.baseline
    raw, prepared = paths.RAW_DIR / DATASET, paths.PREPARED_DIR / DATASET
    train_x, train_y = split_texts(raw, prepared, "train")
    model = make_model(config, params.seed)
    start = time.perf_counter()
    model.fit(train_x, train_y)
    fit_s = time.perf_counter() - start
    val_x, val_y = split_texts(raw, prepared, "val")
    test_x, test_y = split_texts(raw, prepared, "test")
    label_names = [str(n) for n in read_json(prepared / "meta.json")["label_names"]]
    report = classification_report(
        test_y, model.predict_proba(test_x), label_names, params.evaluate.calibration_bins
    )
    result = {
        "model": NAME,
        "dataset": DATASET,
        **{k: round(v, 6) for k, v in report.items() if k.startswith("test_")},
        "val_accuracy": round(float((model.predict(val_x) == val_y).mean()), 6),
        "train_time_s": round(fit_s, 2),
        "features": len(model[0].vocabulary_),
        "train_rows": len(train_y),
        "test_rows": len(test_y),
        "device": "CPU (scikit-learn)",
    }
    write_json_atomic(paths.REPORTS_DIR / "baselines" / NAME / "eval.json", result)
    _log_run(params, result)
    return result


def _log_run(params: Params, result: dict[str, Any]) -> None:
    from dlpipe.tracking import TrainingRun, flatten, git_state, tracking_uri

    run = TrainingRun(tracking_uri(), params.mlflow.require_tracking)
    tags = {"model_family": NAME, "baseline": "true", "dataset": DATASET, **git_state()}
    run.start(
        params.mlflow.experiment,
        f"{NAME}-{git_state()['git_sha'][:7]}",
        None,
        tags,
        {
            "seed": params.seed,
            "model.family": NAME,
            **flatten("baseline", params.baseline.model_dump()),
        },
        params.mlflow.system_metrics_interval_s,
    )
    numbers = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
    run.log_metrics(numbers)
    run.end("FINISHED")
