"""The baseline@<dataset> stage: each dataset's linear yardstick (TF-IDF + logistic regression on
a text dataset's prepared texts, logistic regression on an image dataset's pixels), fit on the
prepared train split, scored on the same test rows, logged as its own MLflow run, shown in the
report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TinyProject, tiny_mnist_arrays
from mlflow.tracking import MlflowClient

from dlpipe.baselines import images, tokens, train_and_evaluate
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import TEXTS_FILE
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
    return pd.DataFrame({"row_id": ids, "label": labels, "text": texts})


def run_of(project: TinyProject, model: str) -> object:
    client = MlflowClient(project.tracking_uri)
    experiment = client.get_experiment_by_name(project.params.mlflow.experiment)
    [run] = client.search_runs([experiment.experiment_id], f"tags.model = '{model}'")
    return run


def write_imdb(root: Path) -> None:
    """What prepare@imdb leaves for the baseline: split files with row ids (in a scrambled order,
    so that the texts must be looked up by id) and texts.parquet with every split's texts."""
    prepared = root / "data/prepared/imdb"
    train, test = reviews(300, seed=1), reviews(200, seed=2)
    splits = {"train": train[:240], "val": train[240:], "test": test}
    for split, frame in splits.items():
        frame = frame.sample(frac=1.0, random_state=0)
        np.savez(
            prepared / f"{split}.npz",
            labels=frame["label"].to_numpy(),
            row_id=frame["row_id"].to_numpy(dtype=str),
        )
    texts = pd.concat(
        [frame[["row_id", "text"]].assign(split=split) for split, frame in splits.items()]
    )
    texts.astype(str).to_parquet(prepared / TEXTS_FILE, index=False)
    meta = json.loads((prepared / "meta.json").read_text())
    (prepared / "meta.json").write_text(json.dumps({**meta, "label_names": ["neg", "pos"]}))
    seal(prepared)


def test_the_text_baseline_learns_the_same_split_and_is_logged(tiny_project: TinyProject) -> None:
    write_imdb(tiny_project.root)
    result = train_and_evaluate(tiny_project.params, "imdb")

    assert result["model"] == tokens.NAME and result["dataset"] == "imdb"
    assert result["test_rows"] == 200 and result["train_rows"] == 240
    assert result["test_accuracy"] == 1.0  # one sentiment word decides each review
    written = json.loads(Path("reports/baselines/imdb/eval.json").read_text())
    assert written == result
    run = run_of(tiny_project, "baseline@imdb")
    assert run.data.tags["model_family"] == tokens.NAME and run.data.tags["baseline"] == "true"
    assert run.data.tags["dataset"] == "imdb"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert run.data.params["baseline.C"] == str(tiny_project.params.baseline.tokens.C)


def test_split_texts_follow_the_split_s_row_order_without_markup(
    tiny_project: TinyProject,
) -> None:
    write_imdb(tiny_project.root)
    prepared = Path("data/prepared/imdb")
    texts, labels = tokens.split_texts(prepared, "val")
    with np.load(prepared / "val.npz") as arrays:
        ids, expected = arrays["row_id"], arrays["labels"]
    by_id = reviews(300, seed=1).set_index("row_id")
    assert texts == [by_id.loc[i, "text"].replace("<br />", " ") for i in ids]
    assert labels.tolist() == expected.tolist()


def test_the_image_baseline_fits_the_pixels_and_is_logged(tiny_project: TinyProject) -> None:
    prepared = tiny_project.root / "data/prepared/mnist"
    np.savez(prepared / "test.npz", **tiny_mnist_arrays(100, seed=5))
    seal(prepared)
    result = train_and_evaluate(tiny_project.params, "mnist")

    assert result["model"] == images.NAME and result["dataset"] == "mnist"
    assert result["train_rows"] == 256 and result["test_rows"] == 100
    assert result["features"] == 28 * 28
    assert result["test_accuracy"] > 0.9  # the bright patch's place is the label
    assert json.loads(Path("reports/baselines/mnist/eval.json").read_text()) == result
    run = run_of(tiny_project, "baseline@mnist")
    assert run.data.tags["model_family"] == images.NAME and run.data.tags["dataset"] == "mnist"
    assert run.data.params["baseline.C"] == str(tiny_project.params.baseline.images.C)


def test_an_unknown_dataset_is_one_line(tiny_project: TinyProject) -> None:
    with pytest.raises(DlpipeError, match=r"unknown dataset 'pets'; params.yaml declares: mnist"):
        train_and_evaluate(tiny_project.params, "pets")


def test_a_missing_split_is_one_line(tiny_project: TinyProject) -> None:
    write_imdb(tiny_project.root)
    Path("data/prepared/imdb/train.npz").unlink()
    with pytest.raises(DlpipeError, match=r"train.npz: missing; run `dvc repro prepare@imdb`"):
        train_and_evaluate(tiny_project.params, "imdb")


def test_missing_texts_are_one_line(tiny_project: TinyProject) -> None:
    write_imdb(tiny_project.root)
    Path("data/prepared/imdb", TEXTS_FILE).unlink()
    seal(Path("data/prepared/imdb"))
    with pytest.raises(
        DlpipeError, match=r"texts.parquet: missing; run `dvc repro prepare@imdb` first"
    ):
        train_and_evaluate(tiny_project.params, "imdb")


def test_a_split_of_an_older_prepare_is_one_line(tiny_project: TinyProject) -> None:
    # The tiny project's text splits have no row ids, as an older prepare stage wrote them.
    with pytest.raises(DlpipeError, match=r"train.npz: no row ids; rerun `dvc repro prepare@imdb`"):
        train_and_evaluate(tiny_project.params, "imdb")
