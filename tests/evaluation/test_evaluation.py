"""The evaluate and report stages: metrics against hand-worked values; outputs and runs complete."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from support.families import REPO_ROOT
from support.servers import MlflowServer
from support.tiny import (
    TinyProject,
    add_test_splits,
    hook_after_epoch,
    run_stage_here,
)

from dlpipe import serving
from dlpipe.evaluation.metrics import classification_report, expected_calibration_error
from dlpipe.evaluation.run import evaluate
from dlpipe.family import load_trained
from dlpipe.report import _card_lines, write_report
from dlpipe.training.run import train

MODELS = ("cnn", "rnn", "transformer")


def test_expected_calibration_error_by_hand() -> None:
    labels = np.array([0, 1, 1, 0])
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.6 (right) with 10 bins:
    # bin 0.9: acc 0.5, conf 0.9 -> |0.4| * 2/4; bin 0.6: acc 1, conf 0.6 -> |0.4| * 2/4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    assert expected_calibration_error(labels, probs, bins=10) == pytest.approx(0.4)


def test_perfectly_calibrated_predictions_have_zero_ece() -> None:
    labels = np.array([0, 1, 0, 1])
    probs = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(labels, probs) == 0.0


# Six test rows, three classes; rows of `probs` are (p_a, p_b, p_c), the argmax is the prediction.
#   row  true  probs               predicted  confidence  correct  p(true)
#   1    a     (0.90, 0.05, 0.05)  a          0.90        yes      0.90
#   2    a     (0.70, 0.20, 0.10)  a          0.70        yes      0.70
#   3    a     (0.30, 0.60, 0.10)  b          0.60        no       0.30
#   4    b     (0.10, 0.80, 0.10)  b          0.80        yes      0.80
#   5    b     (0.15, 0.40, 0.45)  c          0.45        no       0.40
#   6    c     (0.25, 0.20, 0.55)  c          0.55        yes      0.55
HAND_LABELS = np.array([0, 0, 0, 1, 1, 2])
HAND_PROBS = np.array(
    [
        [0.90, 0.05, 0.05],
        [0.70, 0.20, 0.10],
        [0.30, 0.60, 0.10],
        [0.10, 0.80, 0.10],
        [0.15, 0.40, 0.45],
        [0.25, 0.20, 0.55],
    ]
)


def test_classification_report_by_hand() -> None:
    """Every number worked out on paper, so a wrong average or a swapped axis cannot pass."""
    report = classification_report(HAND_LABELS, HAND_PROBS, ["a", "b", "c"], calibration_bins=4)
    # Confusion (rows actual, columns predicted): a -> [2, 1, 0], b -> [0, 1, 1], c -> [0, 0, 1].
    assert report["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # Accuracy: the diagonal, 4 of 6.
    assert report["test_accuracy"] == pytest.approx(4 / 6)
    # Precision = diagonal / column sum: a 2/2 = 1, b 1/2, c 1/2.
    # Recall = diagonal / row sum:       a 2/3,     b 1/2, c 1/1 = 1.
    # F1 = 2PR / (P + R): a 2(2/3)/(5/3) = 4/5, b 2(1/4)/1 = 1/2, c 2(1/2)/(3/2) = 2/3.
    expected_rows = [
        {"class": "a", "precision": 1.0, "recall": 2 / 3, "f1": 4 / 5, "support": 3},
        {"class": "b", "precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2},
        {"class": "c", "precision": 1 / 2, "recall": 1.0, "f1": 2 / 3, "support": 1},
    ]
    assert report["per_class"] == [
        {**row, **{k: pytest.approx(v) for k, v in row.items() if isinstance(v, float)}}
        for row in expected_rows
    ]
    # Macro F1, the unweighted mean: (4/5 + 1/2 + 2/3) / 3 = (24 + 15 + 20) / 90 = 59/90 = 0.6556.
    # (Micro F1 would equal the accuracy, 0.6667; support-weighted F1 would be 0.6778.)
    assert report["test_macro_f1"] == pytest.approx(59 / 90)
    # Log-loss, the mean of -ln p(true): -ln(0.9 * 0.7 * 0.3 * 0.8 * 0.4 * 0.55) / 6
    # = -ln(0.033264) / 6 = 3.40328 / 6 = 0.567213.
    assert report["test_log_loss"] == pytest.approx(-math.log(0.033264) / 6)
    assert report["test_log_loss"] == pytest.approx(0.567213, abs=1e-6)
    # ECE, 4 bins (0, .25], (.25, .5], (.5, .75], (.75, 1] over the confidences:
    #   (.25, .5]: row 5        accuracy 0,   confidence 0.45                 gap 0.45  weight 1/6
    #   (.5, .75]: rows 2, 3, 6 accuracy 2/3, confidence (.7+.6+.55)/3 = .6167 gap 0.05 weight 3/6
    #   (.75, 1]:  rows 1, 4    accuracy 1,   confidence (.9+.8)/2 = .85      gap 0.15  weight 2/6
    # ECE = 0.45/6 + 0.05 * 3/6 + 0.15 * 2/6 = 0.075 + 0.025 + 0.05 = 0.15.
    assert report["test_ece"] == pytest.approx(0.15)


def test_expected_calibration_error_depends_on_the_bins_by_hand() -> None:
    """The same rows in 1, 2 and 3 bins: an edge off by one moves rows and changes the value."""
    # 1 bin: accuracy 4/6 against mean confidence (.9+.7+.6+.8+.45+.55)/6 = 4/6: ECE 0.
    assert expected_calibration_error(HAND_LABELS, HAND_PROBS, bins=1) == pytest.approx(0.0)
    # 2 bins (0, .5], (.5, 1]:
    #   row 5              accuracy 0,   confidence 0.45,          gap 0.45, weight 1/6
    #   rows 1, 2, 3, 4, 6 accuracy 4/5, confidence 3.55/5 = 0.71, gap 0.09, weight 5/6
    # ECE = 0.45/6 + 0.09 * 5/6 = 0.075 + 0.075 = 0.15.
    assert expected_calibration_error(HAND_LABELS, HAND_PROBS, bins=2) == pytest.approx(0.15)
    # 3 bins (0, 1/3], (1/3, 2/3], (2/3, 1]:
    #   rows 3, 5, 6 accuracy 1/3, confidence 1.6/3 = 0.5333, gap 0.2, weight 1/2
    #   rows 1, 2, 4 accuracy 1,   confidence 2.4/3 = 0.8,    gap 0.2, weight 1/2
    # ECE = 0.1 + 0.1 = 0.2.
    assert expected_calibration_error(HAND_LABELS, HAND_PROBS, bins=3) == pytest.approx(0.2)
    # A confidence on an edge belongs to the bin below, (lo, hi] as in Guo et al. (2017):
    # 2 bins, row A confidence 0.5 right, row B confidence 0.9 wrong:
    #   (0, .5]: A, gap |1 - 0.5| = 0.5, weight 1/2; (.5, 1]: B, gap |0 - 0.9| = 0.9, weight 1/2
    # ECE = 0.25 + 0.45 = 0.7 (with [lo, hi) bins both rows would share one: |1/2 - 0.7| = 0.2).
    edge = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    assert expected_calibration_error(np.array([0, 1]), edge, bins=2) == pytest.approx(0.7)


def _accuracy_from_saved_files(name: str) -> tuple[float, int]:
    """Test accuracy and parameter count recomputed from model.pt and test.npz by plain torch,
    apart from the evaluate stage's code, so its scalars are checked and not just bounded."""
    folder = Path("data/models") / name
    model, info, _ = load_trained(folder)
    split = np.load(Path("data/prepared") / info["dataset"] / "test.npz")
    with torch.no_grad():
        if name == "cnn":
            logits = model(torch.from_numpy(split["images"]).float() / 255.0)  # [N, 1, 28, 28]
        else:
            tokens, lengths = torch.from_numpy(split["tokens"]), torch.from_numpy(split["lengths"])
            logits = model(tokens.long(), lengths.long())
    accuracy = float((logits.argmax(dim=1).numpy() == split["labels"]).mean())
    return accuracy, sum(p.numel() for p in model.parameters())


@pytest.mark.integration
def test_evaluate_and_report_end_to_end(tiny_project: TinyProject) -> None:
    add_test_splits(tiny_project)
    params = tiny_project.params
    results = {}
    for name in MODELS:
        train(name, params)
        results[name] = evaluate(name, params)

    client = MlflowClient(tiny_project.tracking_uri)
    for name in MODELS:
        reports = Path("reports/models") / name
        scalars = json.loads((reports / "eval.json").read_text())
        accuracy, parameters = _accuracy_from_saved_files(name)
        assert scalars["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert scalars["latency_b1_ms"] > 0 and scalars["parameters"] == parameters
        confusion = pd.read_csv(reports / "confusion.csv")
        assert len(confusion) == 80 and set(confusion.columns) == {"actual", "predicted"}
        hits = (confusion["actual"] == confusion["predicted"]).mean()
        assert hits == pytest.approx(accuracy)
        assert (reports / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
        mistakes = reports / "mistakes" / ("mistakes.png" if name == "cnn" else "mistakes.md")
        assert mistakes.exists()
        # the test metrics land in the training's run, next to its epochs
        run_id = json.loads((Path("data/models") / name / "mlflow_run.json").read_text())["run_id"]
        run = client.get_run(run_id)
        assert run.data.metrics["test_accuracy"] == pytest.approx(scalars["test_accuracy"])
        assert run.info.status == "FINISHED"
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"confusion_matrix.png", mistakes.name} <= artifacts
        # registered, and as the first version the champion
        decision = json.loads((reports / "registry.json").read_text())
        assert decision["registered_model"] == f"dlpipe-{name}" and decision["promoted"]
        champion = client.get_model_version_by_alias(f"dlpipe-{name}", "champion")
        assert champion.run_id == run_id

    summary = write_report(Path("reports"), tiny_project.write_params()).read_text()
    for name in MODELS:
        assert f"| {name} " in summary
        assert f"{results[name]['test_accuracy']:.4f}" in summary
    assert "learning_curves.png" in summary and "dlpipe-transformer" in summary
    assert Path("reports/learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "[most confident mistakes](models/cnn/mistakes/mistakes.png)" in summary
    text_mistakes = Path("reports/models/rnn/mistakes/mistakes.md").read_text()
    assert "\\|" in text_mistakes  # a pipe inside a review must not break the table


# --- MLflow failures in the evaluate stage ------------------------------------------------------


def fail_logging_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(model_dir: Path) -> str:
        raise MlflowException("artifact store refused the upload")

    monkeypatch.setattr(serving, "log_raw_input_model", fail)


def fail_registering(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(self: MlflowClient, *args: Any, **kwargs: Any) -> Any:
        raise MlflowException("registry is read-only")

    monkeypatch.setattr(MlflowClient, "create_model_version", fail)


@pytest.fixture
def trained_cnn(tiny_project: TinyProject) -> TinyProject:
    """A tiny project with test splits, a trained CNN, params.yaml and a stale registry.json."""
    add_test_splits(tiny_project)
    train("cnn", tiny_project.params)
    tiny_project.write_params()
    stale = Path("reports/models/cnn/registry.json")
    stale.write_text(json.dumps({"registered_model": "dlpipe-cnn", "version": 1}))
    return tiny_project


@pytest.mark.parametrize(
    ("inject", "cause"),
    [
        (fail_logging_the_model, "artifact store refused the upload"),
        (fail_registering, "registry is read-only"),
    ],
    ids=["log-model", "register"],
)
def test_a_failed_registration_fails_the_stage_after_writing_its_results(
    trained_cnn: TinyProject,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    inject: Callable[[pytest.MonkeyPatch], None],
    cause: str,
) -> None:
    """DVC must not take an unregistered model for a finished evaluation (#10)."""
    inject(monkeypatch)
    assert run_stage_here("evaluate", "cnn", monkeypatch) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith(("error:", "warning:"))]
    assert line.startswith("error: evaluate@cnn: ") and "Traceback" not in err, err
    assert cause in line and "not registered" in line and "require_tracking" in line, err
    reports = Path("reports/models/cnn")
    assert json.loads((reports / "eval.json").read_text())["test_accuracy"] >= 0  # kept
    assert not (reports / "registry.json").exists()  # neither stale nor "not registered"
    client = MlflowClient(trained_cnn.tracking_uri)
    assert client.search_registered_models() == [] or not client.search_model_versions()


def test_without_required_tracking_a_failed_registration_is_recorded_and_warned(
    trained_cnn: TinyProject, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    trained_cnn.write_params(trained_cnn.with_mlflow(require_tracking=False))
    fail_logging_the_model(monkeypatch)
    assert run_stage_here("evaluate", "cnn", monkeypatch) == 0
    err = capsys.readouterr().err
    assert "warning: evaluate@cnn: " in err and "artifact store refused the upload" in err, err
    decision = json.loads(Path("reports/models/cnn/registry.json").read_text())
    assert decision["registered"] is False
    assert "artifact store refused the upload" in decision["reason"]


# --- credentials in the tracking URI ------------------------------------------------------------

SECRET = "s3cr3t-t0ken"


def run_stage(stage: str, name: str, root: Path, uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages" / f"{stage}.py"), name],
        cwd=root,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.integration
def test_tracking_credentials_are_never_written_or_printed(
    tiny_project: TinyProject, mlflow_server: str, closed_port: int
) -> None:
    """A tracking URI with `user:token@` trains and evaluates, but the token is in no output, no
    message and no run param or tag; evaluate finds the run through the current URI (#10)."""
    add_test_splits(tiny_project)
    tiny_project.write_params(tiny_project.with_train("cnn", epochs=1))
    uri = mlflow_server.replace("http://", f"http://alice:{SECRET}@")
    trained = run_stage("train", "cnn", tiny_project.root, uri)
    assert trained.returncode == 0, trained.stderr
    info = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())
    assert info["tracking_uri"] == mlflow_server.replace("http://", "http://***@")

    evaluated = run_stage("evaluate", "cnn", tiny_project.root, uri)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(Path("reports/models/cnn/registry.json").read_text())["registered"]
    for done in (trained, evaluated):
        assert SECRET not in done.stdout + done.stderr
    assert files_holding(tiny_project.root, SECRET) == []
    run = MlflowClient(mlflow_server).get_run(info["run_id"])
    assert SECRET not in json.dumps([run.data.params, run.data.tags])
    assert "test_accuracy" in run.data.metrics

    # another store than the training's: one clear line, no secret, nothing registered
    other = f"http://bob:other-secret@127.0.0.1:{closed_port}"
    moved = run_stage("evaluate", "cnn", tiny_project.root, other)
    assert moved.returncode == 2
    [line] = [x for x in moved.stderr.splitlines() if x.startswith("error:")]
    assert f"is in {info['tracking_uri']}, but MLFLOW_TRACKING_URI is http://***@" in line, line
    assert "other-secret" not in moved.stderr, moved.stderr
    assert not Path("reports/models/cnn/registry.json").exists()


def test_credentials_in_an_unreachable_uri_are_not_echoed(
    tiny_project: TinyProject, closed_port: int
) -> None:
    tiny_project.write_params()
    uri = f"http://alice:{SECRET}@127.0.0.1:{closed_port}/?token={SECRET}"
    done = run_stage("train", "cnn", tiny_project.root, uri)
    assert done.returncode == 2
    [line] = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert f"http://***@127.0.0.1:{closed_port}/?token=***" in line, line
    assert SECRET not in done.stdout + done.stderr


# --- the tracking server dies mid-training ------------------------------------------------------


@pytest.mark.integration
def test_the_evaluate_stage_first_delivers_what_a_dead_server_missed(
    tiny_project: TinyProject,
    killable_mlflow_server: MlflowServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The server dies in epoch 2: the train stage succeeds and its last line says what MLflow
    is missing; evaluate fails while the server is down, and delivers the metrics once it is
    back, before logging its own (#10)."""
    add_test_splits(tiny_project)
    server = killable_mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    tiny_project.write_params(tiny_project.with_train("cnn", epochs=3))
    with monkeypatch.context() as patch:
        hook_after_epoch(patch, lambda row: server.kill() if row["epoch"] == 1 else None)
        assert run_stage_here("train", "cnn", patch) == 0
    final = capsys.readouterr().out.splitlines()[-1]
    assert final.startswith("train@cnn: best val_accuracy "), final
    assert "; warning: MLflow log metrics failed" in final and "dlpipe sync" in final, final
    run_id = json.loads(Path("data/models/cnn/mlflow_run.json").read_text())["run_id"]
    spool = tiny_project.root / ".dlpipe" / "spool" / f"{run_id}.jsonl"
    assert f"kept in .dlpipe/spool/{run_id}.jsonl" in final and spool.is_file()

    assert run_stage_here("evaluate", "cnn", monkeypatch) == 2  # still down
    assert "unreachable" in capsys.readouterr().err and spool.is_file()
    assert not Path("reports/models/cnn/registry.json").exists()

    server.start()
    assert run_stage_here("evaluate", "cnn", monkeypatch) == 0
    assert f"MLflow run {run_id}: delivered " in capsys.readouterr().out
    assert not spool.exists()
    client = MlflowClient(server.url)
    for key in ("val_accuracy", "train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3], key
    run = client.get_run(run_id)
    assert "best_epoch" in run.data.metrics and "test_accuracy" in run.data.metrics
    assert run.info.status == "FINISHED"
    assert json.loads(Path("reports/models/cnn/registry.json").read_text())["registered"]


def test_report_data_card_says_how_the_word_vectors_were_learned() -> None:
    split = {"count": 4, "class_counts": [2, 2]}
    card: dict[str, object] = {"train": split, "val": split, "test": split}
    assert not any("word vectors" in line for line in _card_lines("imdb", card))
    card["word_vectors"] = {"dim": 128, "window": 5, "texts": 70000, "unlabeled": 50000}
    assert _card_lines("imdb", card)[-1] == (
        "- word vectors: 128-d PPMI-SVD, window 5, learned without labels from 70,000 texts "
        "(the training split and 50,000 unlabeled)"
    )
    card["word_vectors"] = {"dim": 64, "window": 3, "texts": 900, "unlabeled": 0}
    assert _card_lines("tickets", card)[-1] == (
        "- word vectors: 64-d PPMI-SVD, window 3, learned without labels from 900 texts "
        "(the training split)"
    )
