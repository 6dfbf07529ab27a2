"""The linear baseline stage: TF-IDF + logistic regression on the prepared splits' reviews,
scored on the same test rows, logged as its own MLflow run, shown in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TinyProject
from mlflow.tracking import MlflowClient

from dlpipe.baseline import NAME, train_and_evaluate
from dlpipe.integrity import seal

POSITIVE = ["great", "wonderful", "moving", "superb", "brilliant"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "silly"]
FILLER = ["the", "film", "plot", "actor", "scene", "music", "story", "ending"]


def reviews(count: int, seed: int) -> pd.DataFrame:
    """Reviews whose label shows in one sentiment word among filler, `<br />` markup included."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=count)
    texts = [
        " ".join([*rng.choice(FILLER, 6), rng.choice(POSITIVE if y else NEGATIVE), "<br />"])
        for y in labels
    ]
    ids = [f"s{seed}/{i}" for i in range(count)]
    return pd.DataFrame({"review_id": ids, "label": labels, "text": texts})


def write_imdb(root: Path) -> None:
    """What fetch and prepare@imdb leave: raw parquet files and split files with review ids."""
    raw, prepared = root / "data/raw/imdb", root / "data/prepared/imdb"
    raw.mkdir(parents=True)
    train, test = reviews(300, seed=1), reviews(200, seed=2)
    train.to_parquet(raw / "train.parquet")
    test.to_parquet(raw / "test.parquet")
    for split, frame in (("train", train[:240]), ("val", train[240:]), ("test", test)):
        np.savez(
            prepared / f"{split}.npz",
            labels=frame["label"].to_numpy(),
            review_id=frame["review_id"].to_numpy(dtype=str),
        )
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({**meta, "label_names": ["neg", "pos"]}))
    seal(prepared)


def test_the_baseline_learns_the_same_split_and_is_logged(tiny_project: TinyProject) -> None:
    write_imdb(tiny_project.root)
    result = train_and_evaluate(tiny_project.params)

    assert result["test_rows"] == 200 and result["train_rows"] == 240
    assert result["test_accuracy"] == 1.0  # one sentiment word decides each review
    written = json.loads(Path(f"reports/baselines/{NAME}/eval.json").read_text())
    assert written == result
    client = MlflowClient(tiny_project.tracking_uri)
    [run] = client.search_runs(
        [client.get_experiment_by_name(tiny_project.params.mlflow.experiment).experiment_id]
    )
    assert run.data.tags["model_family"] == NAME and run.data.tags["baseline"] == "true"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert run.data.params["baseline.C"] == str(tiny_project.params.baseline.C)


def test_a_missing_split_is_one_line(tiny_project: TinyProject) -> None:
    from dlpipe.errors import DlpipeError

    with pytest.raises(DlpipeError, match=r"train.npz: no review ids; rerun `dvc repro prep"):
        train_and_evaluate(tiny_project.params)  # written by an older prepare stage
    Path("data/prepared/imdb/train.npz").unlink()
    with pytest.raises(DlpipeError, match=r"train.npz: missing; run `dvc repro prepare@imdb`"):
        train_and_evaluate(tiny_project.params)
