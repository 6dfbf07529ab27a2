"""The linear@<dataset> stage: each dataset's linear models (TF-IDF + logistic regression and
NBSVM on a text dataset's prepared texts, logistic regression on an image dataset's pixels), fit
on the prepared train split, scored on the same test rows, each logged as its own MLflow run,
shown in the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from support.tiny import TinyProject, tiny_mnist_arrays

from dlpipe.errors import DlpipeError
from dlpipe.evaluation.paired import read_predictions
from dlpipe.inputs.tokens import TEXTS_FILE, labelled_texts
from dlpipe.integrity import seal
from dlpipe.linear import fit_and_evaluate, models_for, nbsvm, pixels_logreg, tfidf_logreg

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
    """What prepare@imdb leaves for the linear models: split files with row ids (in a scrambled
    order, so that the texts must be looked up by id) and texts.parquet with every split's
    texts."""
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


def test_every_text_linear_model_learns_the_same_split_and_is_logged(
    tiny_project: TinyProject,
) -> None:
    write_imdb(tiny_project.root)
    results = fit_and_evaluate(tiny_project.params, "imdb")

    assert list(results) == ["nbsvm", "tfidf_logreg"]
    assert json.loads(Path("reports/linear/imdb.json").read_text()) == results
    for module in (nbsvm, tfidf_logreg):
        result = results[module.NAME]
        assert result["model"] == module.NAME and result["dataset"] == "imdb"
        assert result["test_rows"] == 200 and result["train_rows"] == 240
        assert result["test_accuracy"] == 1.0  # one sentiment word decides each review
        predictions = Path(f"reports/linear/imdb/{module.NAME}/confusion.csv")
        actual, predicted = read_predictions(predictions)  # type: ignore[misc]
        with np.load("data/prepared/imdb/test.npz") as arrays:  # the split's rows, in order
            assert actual.tolist() == [["neg", "pos"][i] for i in arrays["labels"]]
        assert (actual == predicted).all()
        run = run_of(tiny_project, f"{module.NAME}@imdb")
        assert run.data.tags["model_family"] == module.NAME and run.data.tags["linear"] == "true"
        assert run.data.tags["dataset"] == "imdb" and run.data.tags["dvc_stage"] == "linear@imdb"
        assert run.info.status == "FINISHED"
        assert run.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    run = run_of(tiny_project, "nbsvm@imdb")
    assert run.data.params["linear.nbsvm.C"] == str(tiny_project.params.linear.nbsvm.C)


def test_each_input_kind_has_its_linear_models() -> None:
    assert models_for("tokens") == [nbsvm, tfidf_logreg]
    assert models_for("images") == [pixels_logreg]


def test_nbsvm_scales_each_ngram_by_its_log_count_ratio_and_handles_many_classes() -> None:
    """Wang & Manning's ratio r = log((p/|p|)/(q/|q|)): a word only one class uses gets the
    largest weight for it; with three classes, one scaled classifier per class, probabilities
    summing to one."""
    from dlpipe.config import NbsvmConfig

    texts = ["red apple", "red cherry", "green pear", "green lime", "blue sky", "blue sea"] * 5
    labels = np.array([0, 0, 1, 1, 2, 2] * 5)
    model = nbsvm.make_model(NbsvmConfig(features=2**16), seed=0).fit(texts, labels)
    probs = model.predict_proba(["red", "green", "blue"])
    assert probs.shape == (3, 3)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [0, 1, 2]
    classifier = model[-1]
    assert len(classifier.ratios_) == 3
    red = model[0].transform(["red"]).indices[0]
    # 15 n-grams seen (9 words, 6 bigrams); class 0 holds 30 of their counts, the others 60.
    assert classifier.features_seen_ == 15
    assert classifier.ratios_[0][red] == pytest.approx(np.log((11 / 45) / (1 / 75)), rel=1e-5)
    unseen = model[0].transform(["violet"]).indices[0]
    assert classifier.ratios_[0][unseen] == 0.0


def test_labelled_texts_follow_the_split_s_row_order_without_markup(
    tiny_project: TinyProject,
) -> None:
    write_imdb(tiny_project.root)
    prepared = Path("data/prepared/imdb")
    texts, labels = labelled_texts(prepared, "val")
    with np.load(prepared / "val.npz") as arrays:
        ids, expected = arrays["row_id"], arrays["labels"]
    by_id = reviews(300, seed=1).set_index("row_id")
    assert texts == [by_id.loc[i, "text"].replace("<br />", " ") for i in ids]
    assert labels.tolist() == expected.tolist()


def test_the_image_linear_model_fits_the_pixels_and_is_logged(tiny_project: TinyProject) -> None:
    prepared = tiny_project.root / "data/prepared/mnist"
    np.savez(prepared / "test.npz", **tiny_mnist_arrays(100, seed=5))
    seal(prepared)
    results = fit_and_evaluate(tiny_project.params, "mnist")
    [result] = results.values()

    assert result["model"] == pixels_logreg.NAME and result["dataset"] == "mnist"
    assert result["train_rows"] == 256 and result["test_rows"] == 100
    assert result["features"] == 28 * 28
    assert result["test_accuracy"] > 0.9  # the bright patch's place is the label
    actual, predicted = read_predictions(  # type: ignore[misc]
        Path("reports/linear/mnist/pixels_logreg/confusion.csv")
    )
    assert len(actual) == 100
    assert (actual == predicted).mean() == pytest.approx(result["test_accuracy"])
    assert json.loads(Path("reports/linear/mnist.json").read_text()) == results
    run = run_of(tiny_project, "pixels_logreg@mnist")
    assert run.data.tags["model_family"] == pixels_logreg.NAME
    assert run.data.tags["dataset"] == "mnist"
    assert run.data.params["linear.pixels_logreg.C"] == str(
        tiny_project.params.linear.pixels_logreg.C
    )


def test_an_unknown_dataset_is_one_line(tiny_project: TinyProject) -> None:
    with pytest.raises(DlpipeError, match=r"unknown dataset 'pets'; params.yaml declares: mnist"):
        fit_and_evaluate(tiny_project.params, "pets")


def test_a_missing_split_is_one_line(tiny_project: TinyProject) -> None:
    write_imdb(tiny_project.root)
    Path("data/prepared/imdb/train.npz").unlink()
    with pytest.raises(DlpipeError, match=r"train.npz: missing; run `dvc repro prepare@imdb`"):
        fit_and_evaluate(tiny_project.params, "imdb")


def test_missing_texts_are_one_line(tiny_project: TinyProject) -> None:
    write_imdb(tiny_project.root)
    Path("data/prepared/imdb", TEXTS_FILE).unlink()
    seal(Path("data/prepared/imdb"))
    with pytest.raises(
        DlpipeError, match=r"texts.parquet: missing; run `dvc repro prepare@imdb` first"
    ):
        fit_and_evaluate(tiny_project.params, "imdb")


def test_a_split_of_an_older_prepare_is_one_line(tiny_project: TinyProject) -> None:
    # The tiny project's text splits have no row ids, as an older prepare stage wrote them.
    with pytest.raises(DlpipeError, match=r"train.npz: no row ids; rerun `dvc repro prepare@imdb`"):
        fit_and_evaluate(tiny_project.params, "imdb")
